"""What the thin and the classic (cow) LVM snapshot back-ends share: resolving origins, the cut with
its idempotency rules, find, delete, and rollback by ``lvconvert --merge``.

A back-end subclass says how to create one snapshot (``_create``), which origins it accepts
(``_accepts``) and how to judge validity. Snapshots live in the origin's VG under the engine-chosen name.
"""
from __future__ import annotations

import logging
from typing import Sequence

from rcopy.engine.ports import Snapshot
from rcopy.errors import Busy, Refused
from rcopy.snapshot.cut import group_cut
from rcopy.sys import lvm, udev

log = logging.getLogger("rcopy.snapshot")


class LvmSnapshotter:
    backend = ""          # "thin" or "cow"
    kind = ""             # words for messages

    # -- hooks -------------------------------------------------------------------------------------
    def _accepts(self, origin: lvm.LV) -> bool:
        raise NotImplementedError

    def _create(self, origin: lvm.LV, name: str) -> lvm.LV:
        raise NotImplementedError

    def _is_ours(self, lv: lvm.LV) -> bool:
        raise NotImplementedError

    def _complete(self, lv: lvm.LV) -> bool:
        """False for a snapshot left half-made by an interrupted cut."""
        return True

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

    def cut(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot]:
        """Snapshot all (origin, name) at one instant. If all exist already: return them (idempotent).
        If only some exist, or not all are complete (a cut interrupted by a crash), they are from
        another instant: remove them and cut again, since a mixed set is not crash-consistent."""
        origins = [self.origin(path) for path, _ in requests]
        for (_, name), o in zip(requests, origins):
            lvm.check_name(name)
        existing = [lvm.get(o.vg, name) for o, (_, name) in zip(origins, requests)]
        if all(lv is not None and self._complete(lv) for lv in existing):
            return [self.find(o.path, name) or self._foreign(o, name) for o, (_, name) in zip(origins, requests)]
        for o, lv in zip(origins, existing):
            if lv is None:
                continue
            if not self._is_ours(lv) or lv.origin not in (o.name, ""):
                self._foreign(o, lv.name)
            log.warning("removing %s: left by an interrupted cut, not consistent with the new one", lv.full_name)
            lvm.remove(lv.vg, lv.name)
        for o in origins:
            self._before_cut(o)
        made = self._take(origins, [name for _, name in requests])
        snaps = []
        for o, lv in zip(origins, made):
            udev.wait_for(lv.path)
            snaps.append(self._snapshot(o, lv))
        return snaps

    def _take(self, origins: list[lvm.LV], names: list[str]) -> list[lvm.LV]:
        """Create the snapshots inside one group cut (rcopy.snapshot.cut); returns them active."""
        return group_cut([o.dm_name for o in origins],
                         lambda: [self._create(o, name) for o, name in zip(origins, names)])

    def _foreign(self, origin: lvm.LV, name: str):
        raise Refused(f"{origin.vg}/{name} exists and is not a {self.kind} snapshot of {origin.full_name}: "
                      f"remove or rename it")

    def _before_cut(self, origin: lvm.LV) -> None:
        """Hook: wait for anything that forbids a new snapshot of ``origin``."""

    def delete(self, snap: Snapshot) -> None:
        vg = lvm.by_path(snap.origin).vg
        lvm.remove(vg, snap.name)

    def rollback(self, snap: Snapshot) -> None:
        """Merge the snapshot into its origin; the origin keeps its name and path. A snapshot already
        gone is taken as already merged (idempotent). The origin must not be open: a merge into an
        open origin is deferred by LVM to its next activation, which is not a rollback."""
        o = lvm.by_path(snap.origin)
        lv = lvm.get(o.vg, snap.name)
        if lv is None:
            log.info("rollback of %s: snapshot already gone (merged before)", snap.name)
            return
        if not lv.merging:
            if o.open:
                raise Busy(f"cannot roll back {o.path} to {snap.name}: the volume is open; close it "
                           f"(unmount, stop its export) and retry")
            lvm.merge(o.vg, snap.name)
        lvm.wait_merged(o.vg, snap.name)
        udev.wait_for(o.path)
