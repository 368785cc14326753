"""LVM thin snapshots (backend "thin"): cheap, in the origin's pool, never overflow on their own.

The group cut cannot simply suspend the origins and call lvcreate, as the cow back-end does: measured
in the lab (LVM 2.03.16), ``lvcreate -s`` of a thin origin that is already suspended skips its own
suspend *and the pool messages that go with it* ("already suspended"), resumes the origin before the
snapshot exists, then fails to activate it (the kernel has no such thin device: ENODATA) and leaves
LVM's transaction id ahead of the pool's, after which no thin LV can be created in that pool.

So the thin cut re-takes the snapshots at the cut instant, by pool messages, under names and device ids
LVM already knows:

1. ``lvcreate -s -ky`` each snapshot beforehand, inactive: LVM allocates its device id and records it.
2. Inside the group's one suspension (rcopy.snapshot.cut, with the thick origins of the same group),
   for each snapshot send the pool ``delete ID`` and ``create_snap ID ORIGIN_ID``: the snapshot now
   holds the origin at the cut instant. These messages do not touch the pool's transaction id, so
   LVM's metadata stays exact.
3. After the resume, clear activation skip and activate the snapshots (one ``lvchange`` for all). A
   snapshot still flagged activation-skip is unfinished: a later cut removes and re-takes it.

HAZARD: a crash between ``delete ID`` and ``create_snap ID`` (two consecutive ioctls) leaves an LV whose
thin device is gone; it cannot be activated and ``lvremove`` of it must be forced. SIGTERM and SIGINT
are held back across the pair (rcopy.sys.interrupts; SIGKILL cannot be). Changes between two thin
snapshots come from the pool metadata (rcopy.changes.thin).
"""
from __future__ import annotations

import os

from rcopy.errors import NoSpace
from rcopy.ports import Snapshot
from rcopy.snapshot.cut import CutPart
from rcopy.snapshot.lvmbase import LvmSnapshotter
from rcopy.sys import dmsetup, interrupts, lvm


def pool_device(vg: str, pool: str) -> str:
    """The dm device that takes pool messages: VG-POOL-tpool (or VG-POOL for a pool alone). Its node
    in /dev/mapper says which exists, without running dmsetup."""
    tpool = lvm.dm_name(vg, pool, "tpool")
    return tpool if os.path.exists("/dev/mapper/" + tpool) else lvm.dm_name(vg, pool)


class ThinSnapshotter(LvmSnapshotter):
    """Implements rcopy.ports.Snapshotter for thin LVs. Every method is idempotent."""

    backend = "thin"
    kind = "thin"

    def _accepts(self, origin: lvm.LV) -> bool:
        return origin.is_thin and origin.thin_id is not None

    def _is_ours(self, lv: lvm.LV) -> bool:
        return lv.is_thin

    def _complete(self, lv: lvm.LV) -> bool:
        return not lv.skip_activation

    def _check_space(self, origins: list[lvm.LV], names: list[str]) -> None:
        """A thin snapshot takes no space when made, but keeps the old blocks of every later write: a
        pool already past the limit (RCOPY_POOL_LIMIT, default 80 %) of its data or metadata would
        fill, and a full pool fails the application's writes. Refuse the sync instead."""
        limit = float(os.environ.get("RCOPY_POOL_LIMIT", "80"))
        for vg, pool in dict.fromkeys((o.vg, o.pool) for o in origins):
            p = lvm.get(vg, pool)
            if p is None:
                continue
            if p.data_percent >= limit or p.metadata_percent >= limit:
                raise NoSpace(f"thin pool {vg}/{pool} is {p.data_percent:.0f}% full (data) and "
                              f"{p.metadata_percent:.0f}% (metadata), over the {limit:.0f}% limit for rcopy's "
                              f"snapshots: extend the pool (lvextend) or free space, then retry")

    def _part(self, origins: list[lvm.LV], names: list[str]) -> CutPart:
        made = [lvm.deactivate(lv) for lv in
                lvm.create_thin_snapshots([(o.vg, o.name, n) for o, n in zip(origins, names)])]
        pools = {(o.vg, o.pool): pool_device(o.vg, o.pool) for o in origins}

        def take() -> None:
            for o, lv in zip(origins, made):
                pool = pools[(o.vg, o.pool)]
                with interrupts.deferred():
                    dmsetup.message(pool, f"delete {lv.thin_id}")
                    dmsetup.message(pool, f"create_snap {lv.thin_id} {o.thin_id}")

        def finish() -> list[Snapshot]:
            return self._finished(origins, names, lvm.activate_all(made))
        return CutPart([o.dm_name for o in origins], take, finish)

    def valid(self, snap: Snapshot) -> bool:
        """A thin snapshot stays valid while it exists, is complete and active (the pool, not the
        snapshot, can fill up: that fails writes to the origin, never the snapshot's content)."""
        lv = lvm.get(lvm.by_path(snap.origin).vg, snap.name)
        return lv is not None and lv.is_thin and lv.active and self._complete(lv) and lv.thin_id is not None
