"""Pick the snapshot back-end for a volume: thin LV -> thin, thick LV -> cow (dm-snapshot), regular
file -> the file simulator. Anything else is refused: rcopy snapshots only what it can cut."""
from __future__ import annotations

import os

from rcopy.engine.ports import Snapshot, Snapshotter
from rcopy.errors import NotFound, Refused
from rcopy.sys import lvm, udev


def backend_name(path: str) -> str:
    """'thin', 'cow' or 'file' for the volume at ``path``."""
    if not os.path.exists(path):
        raise NotFound(f"volume {path} not found: check the path")
    if os.path.isfile(path):
        return "file"
    dev = udev.device(path)
    if not dev.is_lvm:
        raise Refused(f"{path} is not an LVM logical volume: rcopy snapshots thin or thick LVs "
                      f"(or regular files)")
    lv = lvm.by_path(path)
    if lv.is_thin:
        return "thin"
    if lv.is_cow_snapshot or lv.segtype == "thin-pool" or dev.dm_layer:
        raise Refused(f"{path} is an LVM-internal or snapshot LV ({lv.segtype}): give the origin volume")
    return "cow"


def for_backend(name: str) -> Snapshotter:
    if name == "thin":
        from rcopy.snapshot.thin import ThinSnapshotter
        return ThinSnapshotter()
    if name == "cow":
        from rcopy.snapshot.cow import CowSnapshotter
        return CowSnapshotter()
    if name == "file":
        from rcopy.snapshot.file import FileSnapshotter   # owned by the engine; imported lazily
        return FileSnapshotter()
    raise Refused(f"unknown snapshot back-end {name!r}: use thin, cow or file")


def for_device(path: str) -> Snapshotter:
    """The Snapshotter that can cut the volume at ``path``."""
    return for_backend(backend_name(path))


def snapshot_at(path: str) -> Snapshot:
    """Describe an existing snapshot (or any readable image) at ``path`` as a Snapshot value, with the
    back-end that made it: a thin LV is 'thin', a classic snapshot LV 'cow', a regular file 'file'."""
    if not os.path.exists(path):
        raise NotFound(f"snapshot {path} not found: check the path")
    if os.path.isfile(path):
        return Snapshot(origin=path, name=os.path.basename(path), path=path, backend="file")
    if not udev.device(path).is_lvm:
        raise Refused(f"{path} is not an LVM snapshot or a regular file")
    lv = lvm.by_path(path)
    origin = f"/dev/{lv.vg}/{lv.origin}" if lv.origin else path
    if lv.is_thin:
        return Snapshot(origin=origin, name=lv.name, path=lv.path, backend="thin")
    if lv.is_cow_snapshot:
        return Snapshot(origin=origin, name=lv.name, path=lv.path, backend="cow")
    raise Refused(f"{path} is neither a thin LV nor a dm-snapshot: give two snapshots of one volume")
