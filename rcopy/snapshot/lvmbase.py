"""What the thin and the classic (cow) LVM snapshot back-ends share: resolving origins, the cut's
idempotency rules, find, delete, and rollback by ``lvconvert --merge``.

A back-end subclass says how to prepare and take its share of a group cut (``_part``), which origins
it accepts (``_accepts``) and how to judge validity. Snapshots live in the origin's VG under the
engine-chosen name. Every question goes through ``lvm.lvs``, which a caller may batch into one report
per VG (``lvm.reports()``).
"""
from __future__ import annotations

import logging
from typing import Sequence

from rcopy.ports import Snapshot
from rcopy.errors import Busy, Refused
from rcopy.snapshot.cut import CutPart, take
from rcopy.sys import dmsetup, lvm, udev

CLOSE_WAIT = 15.0      # seconds a rollback waits for the last opener of its origin to let go

log = logging.getLogger("rcopy.snapshot")


class LvmSnapshotter:
    backend = ""          # "thin" or "cow"
    kind = ""             # words for messages

    # -- hooks -------------------------------------------------------------------------------------
    def _accepts(self, origin: lvm.LV) -> bool:
        raise NotImplementedError

    def _part(self, origins: list[lvm.LV], names: list[str]) -> CutPart:
        raise NotImplementedError

    def _is_ours(self, lv: lvm.LV) -> bool:
        raise NotImplementedError

    def _complete(self, lv: lvm.LV) -> bool:
        """False for a snapshot left half-made by an interrupted cut."""
        return True

    def _before_cut(self, origin: lvm.LV) -> None:
        """Hook: wait for anything that forbids a new snapshot of ``origin``."""

    def _check_space(self, origins: list[lvm.LV], names: list[str]) -> None:
        """Hook: raise NoSpace, with the numbers, when the snapshots cannot be held."""

    def _half_made(self, origin: lvm.LV, lv: lvm.LV) -> bool:
        """Hook: ``lv``, under the name of a snapshot of ``origin`` this cut is about to take but not
        one, is what an interrupted ``lvcreate -s`` of it left behind (safe to remove)."""
        return False

    # -- Snapshotter -------------------------------------------------------------------------------
    def origin(self, path: str) -> lvm.LV:
        lv = lvm.by_path(path)
        if not self._accepts(lv):
            raise Refused(f"{path} is not a {self.kind} LV ({lv.segtype}): use the matching snapshot back-end")
        return lv

    def _snapshot(self, origin: lvm.LV, lv: lvm.LV) -> Snapshot:
        return Snapshot(origin=origin.path, name=lv.name, path=lv.path, backend=self.backend)

    def find(self, origin: str, name: str) -> Snapshot | None:
        o = lvm.by_path(origin)
        lv = lvm.get(o.vg, name)
        if lv is None or not self._is_ours(lv) or lv.origin not in (o.name, ""):
            return None
        return self._snapshot(o, lv)

    def existing(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot] | None:
        """The snapshots when every one of ``requests`` exists and is complete (a cut already done)."""
        out = []
        for path, name in requests:
            o = self.origin(path)
            lv = lvm.get(o.vg, name)
            if lv is None or not self._is_ours(lv) or lv.origin not in (o.name, "") or not self._complete(lv):
                return None
            out.append(self._snapshot(o, lv))
        return out

    def cut(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot]:
        """Snapshot (origin, name) pairs of this back-end alone at one instant (idempotent)."""
        return take([(self, requests)])

    def _size(self, origin: lvm.LV, name: str) -> int:
        """Hook: the COW store a classic snapshot needs (0: a thin snapshot)."""
        return 0

    def _plain_part(self, origins: list[lvm.LV], names: list[str], *, suspend: bool) -> CutPart:
        """Each snapshot one plain ``lvcreate``, made active and complete at once, nothing read back
        (lvcreate fails if it did not make it; a report read inside the suspension would lengthen the
        applications' freeze). ``suspend``: inside the group's suspension, which LVM finds and keeps
        (the thick cut); without, for origins nobody writes (the backup's read-only secondaries: no
        instant to share), LVM suspends each origin itself for its moment."""
        def take():
            for o, n in zip(origins, names):
                lvm.snapshot_now(o.vg, o.name, n, size=self._size(o, n))
        return CutPart([o.dm_name for o in origins] if suspend else [], take,
                       lambda: self._finished(origins, names, [lvm.lv_path(o.vg, n) for o, n in zip(origins, names)]))

    def prepare(self, requests: Sequence[tuple[str, str]], *, idle: bool = False) -> CutPart:
        """Everything before the suspension. Any existing snapshot of these names is from another
        instant (an interrupted cut): it is removed, since a mixed set is not crash-consistent.
        ``idle``: the origins are not written (see ``_idle_part``)."""
        origins = [self.origin(path) for path, _ in requests]
        names = [lvm.check_name(name) for _, name in requests]
        stale = []
        for o, name in zip(origins, names):
            lv = lvm.get(o.vg, name)
            if lv is None:
                continue
            if not self._is_ours(lv) or lv.origin not in (o.name, ""):
                if not self._half_made(o, lv):
                    self._foreign(o, name)
                log.warning("removing %s: the COW store an interrupted lvcreate of that snapshot left", lv.full_name)
            else:
                log.warning("removing %s: left by an interrupted cut, not consistent with the new one", lv.full_name)
            stale.append((lv.vg, lv.name))
        lvm.remove_all(stale)
        self._check_space(origins, names)
        for o in origins:
            self._before_cut(o)
        return self._plain_part(origins, names, suspend=False) if idle else self._part(origins, names)

    def _finished(self, origins: list[lvm.LV], names: list[str], paths: list[str]) -> list[Snapshot]:
        """The cut's snapshots once their device nodes are there (udev)."""
        snaps = []
        for o, n, p in zip(origins, names, paths):
            udev.wait_for(p)
            snaps.append(Snapshot(origin=o.path, name=n, path=p, backend=self.backend))
        return snaps

    def _foreign(self, origin: lvm.LV, name: str):
        raise Refused(f"{origin.vg}/{name} exists and is not a {self.kind} snapshot of {origin.full_name}: "
                      f"remove or rename it")

    def delete(self, snap: Snapshot) -> None:
        self.delete_all([snap])

    def delete_all(self, snaps: Sequence[Snapshot]) -> None:
        """Remove the snapshots with one lvremove (missing ones are skipped)."""
        lvm.remove_all([(lvm.by_path(s.origin).vg, s.name) for s in snaps])

    def rollback(self, snap: Snapshot) -> None:
        """Merge the snapshot into its origin; the origin keeps its name and path. A snapshot already
        gone is taken as already merged (idempotent). The origin must not be open: a merge into an
        open origin is deferred by LVM to its next activation, which is not a rollback."""
        o = lvm.by_path(snap.origin)
        lv = lvm.get(o.vg, snap.name)
        if lv is None:
            log.info("rollback of %s: snapshot already gone (merged before)", snap.name)
            return
        # LVM refuses to merge a classic snapshot into an origin read-only in its metadata (a
        # secondary always is, rcopy.backends.open_for_sync): writable for the merge, read-only again after
        was_read_only = lv.is_cow_snapshot and not lv.merging and o.attr[1:2] != "w"
        if not lv.merging:
            # An export of a killed agent lets go a moment after it (nbdkit --exit-with-parent): wait
            # for that rather than mark a secondary failed that a few seconds would have rolled back.
            if o.open and not dmsetup.wait_closed(o.dm_name, CLOSE_WAIT):
                raise Busy(f"cannot roll back {o.path} to {snap.name}: the volume is open; close it "
                           f"(unmount, stop its export) and retry")
            if was_read_only:
                (o,) = lvm.set_access([o], writable=True)
            lvm.merge(o.vg, snap.name)
        lvm.wait_merged(o.vg, snap.name)
        if was_read_only:
            lvm.set_access([o], writable=False)
        udev.wait_for(o.path)
