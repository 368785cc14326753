"""The simulator back-end: volumes that are regular files (backend name "file").

It lets the whole CLI run on a host without device-mapper (tests/unit/test_cli_*.py, stratis-cli's
``--sim``). A snapshot is a copy beside the origin, named by the reserved name space
(``<dir>/rcopy.<group>.<volume>.<kind><gen>``), made with ``cp --reflink=auto --sparse=always`` into a
temporary name and renamed, so a crash never leaves a half-made snapshot under a real name. Rollback
copies the snapshot back in place (same inode: an open exporter would see it), then deletes it.
The cut is not one instant across files: the simulator serves tests that do not write during a cut.
"""
from __future__ import annotations

import os
import stat
from typing import Sequence

from rcopy.ports import Snapshot
from rcopy.errors import DeviceError, NotFound
from rcopy.snapshot.cut import CutPart, take
from rcopy.sys.run import run

BACKEND = "file"
_PROBE = 1 << 20


class SnapshotCopyFailed(DeviceError):
    """cannot copy {src} to {dst}: {msg}"""


def is_file_volume(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def volume_size(path: str) -> int:
    """Bytes of a regular file or block device."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NotFound(f"{path}: {e.strerror}: give an existing device or file") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def has_data(path: str) -> bool:
    """True if any byte of the file is non-zero (holes are skipped with SEEK_DATA, so sparse files are cheap)."""
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only holes after pos
                return False
            end = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            while pos < end:
                chunk = os.pread(fd, min(_PROBE, end - pos), pos)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return True
                pos += len(chunk)
    return False


def _copy(src: str, dst: str):
    """Copy src over dst (reflink where the filesystem can, holes kept), then fsync dst."""
    res = run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst], timeout=3600)
    if not res.ok:
        raise SnapshotCopyFailed(src=src, dst=dst, msg=(res.stderr.strip() or f"exit {res.rc}"))
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshots_of(origin: str) -> list[str]:
    """Names of the reserved snapshots of the file volume ``origin`` (they live beside it)."""
    from rcopy.names import parse, volume_name
    here = os.path.dirname(os.path.abspath(origin))
    me = volume_name(origin)
    return [n for n in sorted(os.listdir(here)) if (p := parse(n)) is not None and p.volume == me]


class FileSnapshotter:
    """Implements rcopy.ports.Snapshotter for regular files. Every method is idempotent."""

    backend = BACKEND

    def _path(self, origin: str, name: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(origin)), name)

    def existing(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot] | None:
        snaps = [self.find(origin, name) for origin, name in requests]
        return snaps if all(snaps) else None

    def cut(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot]:
        """Snapshot (origin, name) pairs of this back-end alone at one instant (idempotent)."""
        return take([(self, requests)])

    def prepare(self, requests: Sequence[tuple[str, str]], *, idle: bool = False) -> CutPart:
        """Copies are taken "inside" the cut (nothing to suspend: the simulator's tests do not write
        during a cut); a leftover copy of an interrupted cut is replaced."""
        out: list[Snapshot] = []

        def take():
            for origin, name in requests:
                path = self._path(origin, name)
                tmp = path + ".tmp"
                _copy(origin, tmp)
                os.rename(tmp, path)
                _fsync_dir(path)
                out.append(Snapshot(origin, name, path, BACKEND))
        return CutPart([], take, lambda: out)

    def find(self, origin: str, name: str) -> Snapshot | None:
        path = self._path(origin, name)
        return Snapshot(origin, name, path, BACKEND) if os.path.isfile(path) else None

    def valid(self, snap: Snapshot) -> bool:
        try:
            return os.path.getsize(snap.path) == os.path.getsize(snap.origin)
        except OSError:
            return False

    def delete_all(self, snaps: Sequence[Snapshot]) -> None:
        for snap in snaps:
            self.delete(snap)

    def delete(self, snap: Snapshot) -> None:
        try:
            os.unlink(snap.path)
        except FileNotFoundError:
            return
        _fsync_dir(snap.path)

    def rollback(self, snap: Snapshot) -> None:
        if not os.path.exists(snap.path):
            return                      # already consumed by an earlier, interrupted rollback
        _copy(snap.path, snap.origin)
        self.delete(snap)
