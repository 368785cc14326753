"""The backup's side of the data path: export a set of volumes over NBD for the duration of one sync.

One nbdkit (file plugin, ``dir=`` mode) per link address serves every volume of the session as a named
export (several links: the primary spreads its connections over them, rcopy.transport.sender): the
directory holds one symlink per volume (name -> device), and nbdkit follows them (checked on nbdkit
1.32 with a symlink to a file; block devices are served the same way). Optionally TLS with a certificate
made for this session, which the control channel hands to the primary to pin, and with the primary's own
per-session certificate as the only client admitted (``--tls-verify-peer``): nobody else on the link or
on the backup can read or write the secondaries during a sync. With ``allow_peers`` (the primary's link
addresses) rcopy's nbdkit filter closes every connection from another address before the NBD handshake. The export names are never listed. nbdkit dies with its
parent (``--exit-with-parent``), so a crashed agent leaves no writable export behind.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Mapping

from rcopy.ports import ExportInfo
from rcopy.errors import NotFound, UsageError
from rcopy.sys import nbdkit, scratch

log = logging.getLogger("rcopy")
_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+:-]{0,127}$")


class BadExportName(UsageError):
    """export name {name!r} is not allowed: use letters, digits and _.+:- (no slash, not starting with a dot)"""


class VolumeMissing(NotFound):
    """cannot export {path}: {msg}"""


def device_size(path: str) -> int:
    """Size in bytes of a regular file or block device (st_size is 0 for a block device)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise VolumeMissing(e.strerror, path=path) from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class Export:
    """Context manager: ``with Export({"data": "/dev/vg/data"}, host=addr, tls=True) as ex: ex.infos``.
    ``more_hosts``: the backup's addresses on its other links, served by an nbdkit each (same volumes,
    same certificate); an ExportInfo names them in ``more``."""

    def __init__(self, volumes: Mapping[str, str], *, host: str = "127.0.0.1", port: int | None = None,
                 tls: bool = False, readonly: bool = False, client_cert_pem: str | None = None,
                 minblock: int = 0, allow_peers: tuple[str, ...] = (), more_hosts: tuple[str, ...] = (),
                 unmap: Mapping[str, int] | None = None):
        for name in volumes:
            if not _NAME.match(name):
                raise BadExportName(name=name)
        self.volumes = dict(volumes)
        self.host, self.port, self.tls, self.readonly = host, port, tls, readonly
        self.more_hosts = tuple(h for h in dict.fromkeys(more_hosts) if h != host)
        self.client_cert_pem = client_cert_pem
        self.minblock = minblock
        self.allow_peers = tuple(allow_peers)
        # volume name -> pool block size: its zero runs unmap whole blocks (rcopy.backends.unmap_granules)
        self.unmap = {n: g for n, g in (unmap or {}).items() if n in self.volumes}
        self.servers: list[nbdkit.NbdkitServer] = []
        self.infos: dict[str, ExportInfo] = {}
        self._dir: str | None = None

    def start(self) -> dict[str, ExportInfo]:
        sizes = {name: device_size(path) for name, path in self.volumes.items()}
        self._dir = scratch.make("export")
        try:
            vols = os.path.join(self._dir, "volumes")
            os.mkdir(vols)
            for name, path in self.volumes.items():
                os.symlink(os.path.abspath(path), os.path.join(vols, name))
            pem, tls_dir = None, None
            if self.tls:
                tls_dir = os.path.join(self._dir, "tls")
                os.mkdir(tls_dir, 0o700)
                pem = nbdkit.make_tls_dir(tls_dir, client_cert_pem=self.client_cert_pem)
            # exportname-list=error: the export names are not listed to anyone who connects
            # minblock: every write reaches the device as whole blocks of that size (nbdkit's blocksize
            # filter reads, modifies and writes the block around a smaller request): what a thin pool
            # without zeroing needs (rcopy.backends.write_granule)
            blocks = ("blocksize",) if self.minblock else ()
            unmap = tuple(f"{n}:{g}:{os.path.abspath(self.volumes[n])}" for n, g in sorted(self.unmap.items()))
            for i, host in enumerate((self.host, *self.more_hosts)):
                try:
                    self.servers.append(nbdkit.start(
                        "file", f"dir={vols}", "exportname-list=error",
                        *([f"minblock={self.minblock}"] if self.minblock else []),
                        host=host, port=self.port if i == 0 else None, readonly=self.readonly, tls_dir=tls_dir,
                        verify_peer=bool(self.client_cert_pem), filters=("exportname", *blocks),
                        allow_peers=self.allow_peers, unmap=unmap, within=self._dir))
                except nbdkit.NbdkitError as e:
                    if i == 0:
                        raise
                    log.warning("no export on link address %s (%s): the sync uses the other links", host, e)
        except BaseException:
            self.stop()
            raise
        first, more = self.servers[0], tuple((s.host, s.port) for s in self.servers[1:])
        self.infos = {name: ExportInfo(host=first.host, port=first.port, name=name, size=size,
                                       tls_cert_pem=pem, more=more) for name, size in sizes.items()}
        return self.infos

    @property
    def server(self) -> nbdkit.NbdkitServer | None:
        """The export on the first link (the one the control channel came in on)."""
        return self.servers[0] if self.servers else None

    def stop(self) -> None:
        """Stop every nbdkit and remove the session directory (certificate and key included). Idempotent."""
        while self.servers:
            self.servers.pop().stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "Export":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
