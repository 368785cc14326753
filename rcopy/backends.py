"""Hands out the real implementations of the engine's ports for a volume (the CLI's and agent's wiring).

The engine sees only rcopy.engine.ports; this is where a path becomes a Snapshotter (file simulator,
LVM thin or dm-snapshot via rcopy.snapshot.select), a Snapshotter a ChangeSource, and where the
full-sync extents, the NBD Sender and the volume digest for ``verify`` come from.
"""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Iterator

from rcopy.engine.ports import ChangeSource, Snapshot, Snapshotter
from rcopy.errors import DeviceError, DeviceUnsafe, Refused
from rcopy.extent import Extent
from rcopy.snapshot import file as filesnap

_cache: dict[str, Snapshotter] = {}
_lock = threading.Lock()


def snapshotter_for(path: str) -> Snapshotter:
    """One Snapshotter instance per back-end, so the driver cuts all volumes of a back-end together."""
    if filesnap.is_file_volume(path):
        name = filesnap.BACKEND
    else:
        from rcopy.snapshot.select import backend_name
        name = backend_name(path)
    with _lock:
        if name not in _cache:
            if name == filesnap.BACKEND:
                _cache[name] = filesnap.FileSnapshotter()
            else:
                from rcopy.snapshot.select import for_backend
                _cache[name] = for_backend(name)
        return _cache[name]


def changes_for(snapper: Snapshotter) -> ChangeSource:
    from rcopy.changes.select import change_source_for
    return change_source_for(snapper)


def full_extents(snap: Snapshot) -> Iterator[Extent]:
    """Every non-zero block of the snapshot as data, zero runs as zero extents (a full sync)."""
    from rcopy.changes.scan import scan
    return scan(None, snap.path)


def sender():
    from rcopy.transport.sender import NbdSender
    return NbdSender()


def digest(path: str) -> str:
    """sha256 of a whole volume or snapshot (``rcopy verify``)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
    except OSError as e:
        raise DeviceError(f"cannot read {path} to verify it: {e.strerror}") from None
    return h.hexdigest()


def volume_size(path: str) -> int:
    return filesnap.volume_size(path)


def check_secondary(path: str, size: int, *, force: bool = False, nosync: bool = False) -> None:
    """Refuse a secondary that is missing, of another size, or holds data (design §2.10) unless forced."""
    have = volume_size(path)
    if have != size:
        raise Refused(f"secondary {path} is {have} bytes but the primary volume is {size} bytes: "
                      "give a secondary of the same size")
    from rcopy.safety import check_writable
    check_writable(path, expected_size=size, force=force)
    if filesnap.is_file_volume(path) and not (force or nosync) and filesnap.has_data(path):
        raise DeviceUnsafe(f"refusing to overwrite {path}: it holds data (non-zero bytes); "
                           "use --force to overwrite it, or --nosync if it already equals the primary")


def is_regular_file(path: str) -> bool:
    return os.path.isfile(path)
