"""Classic dm-snapshot of thick LVs (backend "cow"): a COW store that holds every origin chunk
overwritten since the snapshot, and overflows (becomes invalid) when it fills up.

``lvcreate -s -L SIZE -n NAME VG/LV``; SIZE defaults to half the origin (``cow_ratio``): a snapshot
that lives one sync period must hold every chunk the origin writes in that period. An overflowed
snapshot is reported invalid (``dmsetup status`` says "Invalid"), which makes the next sync full
(design §2.4). Rollback merges it with ``lvconvert --merge``; the snapshot-merge target shows the
merged view at once, and a new snapshot of that origin waits until the merge has finished.
"""
from __future__ import annotations

from rcopy.ports import Snapshot
from rcopy.errors import NoSpace, UsageError
from rcopy.names import parse
from rcopy.snapshot.cut import CutPart
from rcopy.snapshot.lvmbase import LvmSnapshotter
from rcopy.sys import lvm

DEFAULT_COW_RATIO = 0.5
COW_CHUNK = 4096          # lvcreate's default snapshot chunk size
MIB = 1 << 20


class CowSnapshotter(LvmSnapshotter):
    """Implements rcopy.ports.Snapshotter for thick LVs with dm-snapshot. Idempotent."""

    backend = "cow"
    kind = "thick (dm-snapshot)"

    def __init__(self, cow_ratio: float = DEFAULT_COW_RATIO):
        if not 0 < cow_ratio <= 1.1:
            raise UsageError(f"COW size ratio {cow_ratio} must be in (0, 1.1] of the origin's size")
        self.cow_ratio = cow_ratio

    def _accepts(self, origin: lvm.LV) -> bool:
        return not origin.is_thin and not origin.is_cow_snapshot and origin.segtype not in ("thin-pool", "")

    def _is_ours(self, lv: lvm.LV) -> bool:
        return lv.is_cow_snapshot

    def cow_size(self, origin: lvm.LV, name: str = "") -> int:
        """Bytes of COW store for snapshot ``name`` of ``origin``. A rollback snapshot R(n) (and a failover
        F(n) or kept K(n), which outlive a whole resync too) must survive
        the whole resync it protects, a full one included: it covers the entire volume plus the
        exception table (16 bytes per 4 KiB chunk, 256 per metadata chunk) and the header. A resync
        snapshot P(n) holds one period's writes (``cow_ratio`` of the volume); if it overflows, the
        next sync is full (design §2.4), nothing is lost."""
        ext = origin.extent_size or 4 << 20
        snap = parse(name)
        if snap is not None and snap.kind in "RFK":     # R, and F / K that outlive the way back
            chunks = -(-origin.size // COW_CHUNK)
            want = origin.size + (-(-chunks // 256) + 2) * COW_CHUNK
        else:
            want = int(origin.size * self.cow_ratio)
        return max(ext, -(-want // ext) * ext)

    def _check_space(self, origins: list[lvm.LV], names: list[str]) -> None:
        need: dict[str, int] = {}
        free: dict[str, int] = {}
        for o, n in zip(origins, names):
            need[o.vg] = need.get(o.vg, 0) + self.cow_size(o, n)
            free[o.vg] = o.vg_free
        for vg, bytes_ in need.items():
            if bytes_ > free[vg]:
                raise NoSpace(f"VG {vg} has {free[vg] // MIB} MiB free but its snapshots for this sync need "
                              f"{bytes_ // MIB} MiB: extend the VG (vgextend) or free space, then retry")

    def _half_made(self, origin: lvm.LV, lv: lvm.LV) -> bool:
        """``lvcreate -s`` commits the COW store as a plain LV under the snapshot's name, wipes its
        header, then commits it again as the snapshot: stopped in between (power cut, SIGKILL) it
        leaves that plain LV. Only one exactly so is taken for it: linear, not open, not tagged, of
        the size rcopy asks for that snapshot (cow_size); anything else under the name is refused."""
        return (lv.segtype == "linear" and lv.attr[:1] == "-" and not lv.origin and not lv.open
                and not lv.tags and lv.size == self.cow_size(origin, lv.name))

    def _size(self, origin: lvm.LV, name: str) -> int:
        return self.cow_size(origin, name)

    def _part(self, origins: list[lvm.LV], names: list[str]) -> CutPart:
        """lvcreate inside the group's suspension: it finds the origin already suspended, loads the
        snapshot tables and resumes the origin once its snapshot exists (measured, LVM 2.03.16)."""
        return self._plain_part(origins, names, suspend=True)

    def _before_cut(self, origin: lvm.LV) -> None:
        """A merge in progress into this origin forbids a new snapshot: wait for it to finish."""
        for lv in lvm.lvs(origin.vg):
            if lv.origin == origin.name and lv.merging:
                lvm.wait_merged(lv.vg, lv.name)

    def valid(self, snap: Snapshot) -> bool:
        """Valid while the LV exists, is active, and LVM does not report it invalid (LVM reads the
        snapshot target's status for ``lv_snapshot_invalid``: an Invalid or Overflow snapshot is 'I')."""
        lv = lvm.get(lvm.by_path(snap.origin).vg, snap.name)
        return lv is not None and lv.is_cow_snapshot and not lv.snapshot_invalid and lv.active

