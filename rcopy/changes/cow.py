"""Changed extents between two dm-snapshots of one thick volume, from the older one's COW store.

The exception table of P(n)'s COW device lists every origin chunk written since P(n) was taken
(rcopy.sys.cow reads it with O_DIRECT). Read right after P(n+1) is created, it is a superset of
diff(P(n), P(n+1)) — later writes only add candidates, which the refine then drops. HAZARD: an
invalid (overflowed) P(n) has lost exceptions; its table must never be used: SnapshotInvalid.
"""
from __future__ import annotations

from typing import Iterator

from rcopy.changes.refine import refine
from rcopy.ports import Snapshot
from rcopy.errors import Refused
from rcopy.extent import Extent
from rcopy.sys import cow, lvm


class SnapshotInvalid(Refused):
    """{msg}"""


def cow_device(lv: lvm.LV) -> str:
    return "/dev/mapper/" + lvm.dm_name(lv.vg, lv.name, "cow")


def candidates(old: lvm.LV) -> list[Extent]:
    """Byte ranges of the origin written since ``old`` was taken, from its exception table."""
    if old.snapshot_invalid:
        raise _invalid(old)
    table = cow.read_device(cow_device(old))    # the kernel clears the header's valid flag on overflow
    if not table.valid:
        raise _invalid(old)
    size = old.volume_size
    return [Extent(off, min(length, size - off)) for off, length in cow.extents(table) if off < size]


def _invalid(lv: lvm.LV) -> SnapshotInvalid:
    return SnapshotInvalid(f"snapshot {lv.full_name} is invalid (its COW store overflowed): it cannot "
                           f"serve as a base; the next sync must be full")


class CowChanges:
    """Implements rcopy.ports.ChangeSource for classic dm-snapshots."""

    check_commands = 0        # unchanged_since reads the COW table: no command

    def changed(self, old: Snapshot, new: Snapshot, *, block_size: int = 4096, remote=None) -> Iterator[Extent]:
        a, b = lvm.by_path(old.path), lvm.by_path(new.path)
        if not (a.is_cow_snapshot and b.is_cow_snapshot and a.vg == b.vg and a.origin == b.origin):
            raise Refused(f"{old.path} and {new.path} are not dm-snapshots of one origin")
        return refine(old.path, new.path, candidates(a), block_size=block_size, size=b.volume_size)

    def unchanged_since(self, base: Snapshot, origin: str) -> bool:
        """``base``'s exception table is empty: dm-snapshot commits an exception to the COW device
        before the origin write it protects completes, so no exception means no completed write."""
        a = lvm.by_path(base.path)
        if not a.is_cow_snapshot or a.snapshot_invalid or lvm.by_path(origin).name != a.origin:
            return False
        return not candidates(a)
