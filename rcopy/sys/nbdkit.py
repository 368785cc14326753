"""nbdkit, the NBD server the backup runs for the duration of a sync (nbdkit(1), nbdkit-file-plugin(1)).

The only code that starts nbdkit or makes its TLS certificate directory. nbdkit runs in the foreground
with ``--exit-with-parent`` (it dies with us, however we die) and writes its pidfile once it listens, which
is how we know it is ready (nbdkit(1), "-P"). Certificates are throw-away, self-signed, one per session,
made in-process (rcopy.sys.certs); the client pins the exact certificate, so no names or CA chain matter.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

from rcopy.errors import ToolError
from rcopy.sys import scratch
from rcopy.sys.run import run, spawn

PROBE_DIR = "/run/rcopy"
_TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
# rcopy's own nbdkit filters (native/, built by setup.py): the peer filter admits the primary's link
# addresses only; the unmap filter turns zero runs into discards of whole thin pool blocks
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_FILTER = os.path.join(_HERE, "nbdkit-rcopy-peer.so")
UNMAP_FILTER = os.path.join(_HERE, "nbdkit-rcopy-unmap.so")
log = logging.getLogger("rcopy")


class NbdkitError(ToolError):
    """nbdkit did not start on {where}: {msg}"""


@dataclasses.dataclass
class NbdkitServer:
    """A running nbdkit; stop() ends it (idempotent)."""

    proc: subprocess.Popen
    host: str
    port: int
    workdir: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; remove its pidfile/log directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL at once: what a crash of the backup looks like to the client."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a race remains: start() retries on a clash)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def peer_filter() -> str | None:
    """The path of rcopy's peer filter if this nbdkit loads it, else None. nbdkit's own ip filter would
    do, but 1.32.5's rejects every address rule ("cannot parse address")."""
    return _own_filter(PEER_FILTER)


def unmap_filter() -> str | None:
    """The path of rcopy's unmap filter (native/rcopy_unmap_filter.c) if this nbdkit loads it, else None."""
    return _own_filter(UNMAP_FILTER)


@functools.lru_cache(maxsize=None)
def _own_filter(path: str) -> str | None:
    """``path`` if this nbdkit loads that filter of rcopy's, else None (not built: no nbdkit headers where
    rcopy was built; or built for another nbdkit version, which nbdkit refuses)."""
    if not os.path.exists(path):
        return None
    # One probe per boot, not per sync (each sync's agent is a new process): remembered in /run, keyed
    # by both files, so an upgraded nbdkit or rcopy is probed again.
    stamp = ":".join(_stamp(p) for p in (shutil.which("nbdkit") or "nbdkit", path))
    name = os.path.basename(path).replace("nbdkit-rcopy-", "").replace(".so", "")
    mark = os.path.join(PROBE_DIR, f"{name}-filter-loads")
    try:
        with open(mark) as f:
            if f.read() == stamp:
                return path
    except OSError:
        pass
    res = run(["nbdkit", f"--filter={path}", "null", "--dump-plugin"], timeout=30)
    if not res.ok:
        return None
    try:
        os.makedirs(PROBE_DIR, mode=0o700, exist_ok=True)
        with open(mark, "w") as f:
            f.write(stamp)
    except OSError:
        pass                                    # only the next probe is lost
    return path


def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"


def start(plugin: str, *plugin_args: str, host: str = "127.0.0.1", port: int | None = None,
          readonly: bool = False, tls_dir: str | None = None, verify_peer: bool = False,
          filters: tuple[str, ...] = (), allow_peers: tuple[str, ...] = (), unmap: tuple[str, ...] = (),
          extra: tuple[str, ...] = (), ready_timeout: float = 15.0, within: str | None = None) -> NbdkitServer:
    """Start ``nbdkit PLUGIN ARGS`` listening on host:port (a free port when None) and wait until it
    accepts connections. With ``allow_peers`` (IP addresses) every connection from another address is
    closed before the NBD handshake, by rcopy's peer filter; where nbdkit cannot load it, a warning, and
    the export relies on TLS (``verify_peer``) alone. ``unmap``: EXPORT:GRANULARITY:PATH entries for rcopy's
    unmap filter, innermost (it sees the blocks the other filters leave); without it, zeroes are written.
    nbdkit's pid and log files go in a directory made inside ``within`` (the caller's own scratch
    directory, swept already), else in a scratch directory of their own."""
    if unmap:
        thin = unmap_filter()
        if thin:
            filters, plugin_args = (*filters, thin), (*plugin_args, *(f"unmap={u}" for u in unmap))
        else:
            log.info("nbdkit cannot load rcopy's unmap filter (%s): zero runs allocate the thin secondaries",
                     UNMAP_FILTER)
    if allow_peers:
        fence = peer_filter()
        if fence:
            filters, plugin_args = (fence, *filters), (*plugin_args, *(f"allow={a}" for a in allow_peers))
        else:
            log.warning("nbdkit cannot load rcopy's peer filter (%s): the export on %s admits any address "
                        "and relies on TLS alone", PEER_FILTER, host)
    attempts = 1 if port is not None else 5
    last = ""
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        workdir = tempfile.mkdtemp(prefix="nbdkit-", dir=within) if within else scratch.make("nbdkit")
        pidfile, logfile = os.path.join(workdir, "pid"), os.path.join(workdir, "stderr")
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", host, "-p", str(p), "-P", pidfile]
        if readonly:
            argv.append("--readonly")
        if tls_dir:
            argv += ["--tls=require", f"--tls-certificates={tls_dir}"]
            if verify_peer:
                argv.append("--tls-verify-peer")
        argv += [f"--filter={f}" for f in filters]
        argv += [*extra, plugin, *plugin_args]
        srv = NbdkitServer(spawn(argv, stderr_path=logfile), host, p, workdir)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if os.path.exists(pidfile) and os.path.getsize(pidfile):
                return srv
            if not srv.alive():
                break
            time.sleep(0.02)
        last = _tail(logfile) or f"not ready after {ready_timeout} s"
        srv.stop()
        if "in use" not in last:
            break
    raise NbdkitError(last, where=f"{host}:{port or 'a free port'}")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def make_certificate(cert: str, key: str, common_name: str) -> str:
    """A fresh self-signed EC certificate and its key (mode 0600) at those paths; returns the PEM."""
    from rcopy.sys import certs
    return certs.make(cert, key, common_name)


def make_tls_dir(directory: str, common_name: str = "rcopy", client_cert_pem: str | None = None) -> str:
    """Write a fresh self-signed certificate and key into directory as nbdkit expects them
    (ca-cert.pem, server-cert.pem, server-key.pem); return the certificate PEM for the client to pin.

    With ``client_cert_pem`` the CA file holds exactly the client's self-signed certificate: started
    with ``verify_peer``, nbdkit then admits only a client presenting it (GnuTLS accepts a certificate
    that is itself in the trust list; checked on nbdkit 1.32.5)."""
    pem = make_certificate(os.path.join(directory, "server-cert.pem"), os.path.join(directory, "server-key.pem"),
                           common_name)
    with open(os.path.join(directory, _TLS_FILES[0]), "w") as f:
        f.write(client_cert_pem or pem)
    return pem
