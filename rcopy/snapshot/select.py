"""Which snapshot back-end a device needs: thin LV -> thin, thick LV -> cow (dm-snapshot), regular
file -> the file simulator. Asked once, when a volume is admitted (rcopy.backends.probe); anything else
is refused: rcopy snapshots only what it can cut."""
from __future__ import annotations

import os

from rcopy.ports import Snapshot
from rcopy.errors import NotFound, Refused
from rcopy.sys import lvm, udev


def backend_name(path: str) -> tuple[str, str]:
    """('thin' | 'cow' | 'file', stable identity) of the volume at ``path``.

    The identity names the device whatever path reaches it: ``lv:UUID`` for an LV (survives renames),
    ``file:DEV:INODE`` for a regular file.
    """
    if not os.path.exists(path):
        raise NotFound(f"volume {path} not found: check the path")
    if os.path.isfile(path):
        st = os.stat(path)
        return "file", f"file:{st.st_dev}:{st.st_ino}"
    dev = udev.device(path)
    if not dev.is_lvm:
        raise Refused(f"{path} is not an LVM logical volume: rcopy snapshots thin or thick LVs "
                      f"(or regular files)")
    lv = lvm.by_path(path)
    if lv.lock_type:
        raise Refused(f"{path} is in VG {lv.vg}, shared through lvmlockd (lock type {lv.lock_type}): other hosts "
                      "may write it, and no snapshot here would hold their writes; rcopy replicates LVs of "
                      "local VGs")
    if lv.is_cow_snapshot or lv.segtype == "thin-pool" or dev.dm_layer:
        raise Refused(f"{path} is an LVM-internal or snapshot LV ({lv.segtype}): give the origin volume")
    return ("thin" if lv.is_thin else "cow"), f"lv:{lv.uuid}"


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
