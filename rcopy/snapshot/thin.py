"""LVM thin snapshots (backend "thin"): cheap, in the origin's pool, never overflow on their own.

Snapshots are created with ``lvcreate -s VG/LV -n NAME`` (no size: thin) and activation skip cleared
(``-kn``), so they are active block devices the refine and the sender can read. Changes between two
of them come from the pool metadata (rcopy.changes.thin).
"""
from __future__ import annotations

from rcopy.engine.ports import Snapshot
from rcopy.snapshot.lvmbase import LvmSnapshotter
from rcopy.sys import lvm


class ThinSnapshotter(LvmSnapshotter):
    """Implements rcopy.engine.ports.Snapshotter for thin LVs. Every method is idempotent."""

    backend = "thin"
    kind = "thin"

    def _accepts(self, origin: lvm.LV) -> bool:
        return origin.is_thin

    def _is_ours(self, lv: lvm.LV) -> bool:
        return lv.is_thin

    def _create(self, origin: lvm.LV, name: str) -> lvm.LV:
        return lvm.create_thin_snapshot(origin.vg, origin.name, name)

    def valid(self, snap: Snapshot) -> bool:
        """A thin snapshot stays valid while it exists and is active (the pool, not the snapshot, can
        fill up: that fails writes to the origin, never the snapshot's content)."""
        lv = lvm.get(lvm.by_path(snap.origin).vg, snap.name)
        return lv is not None and lv.is_thin and lv.active and lv.thin_id is not None
