"""The applications' writes come first: before a thin pool that holds rcopy's own snapshots fills, the
daemon drops them there, and that group's next sync goes full with the reason.

A thin snapshot P(n) pins the old blocks of everything the application rewrites; a pool sized for the
volume but not for the volume plus rcopy's snapshots fills, and the application's next write fails
(seen in the lab: EIO at 100%). 3PAR in that spot invalidates its resync snapshot and keeps serving host
writes; rcopy does the same, and never touches a snapshot it did not create (K, the admin's, stays).
"""
from __future__ import annotations

import logging
import os

from rcopy import backends
from rcopy.app import alerts as alerts_
from rcopy.engine import cycle
from rcopy.errors import RcopyError
from rcopy.state import Store
from rcopy.sys import lvm

log = logging.getLogger("rcopy.space")
GUARD = float(os.environ.get("RCOPY_POOL_GUARD", "90"))     # % of a pool's data or metadata


def pressure(data: float, meta: float, limit: float = GUARD) -> str:
    """Why a pool at these usages (percent) must give its blocks back to the applications, or ""."""
    if data >= limit:
        return f"is {data:.0f}% full (data), over the {limit:.0f}% guard"
    if meta >= limit:
        return f"is {meta:.0f}% full (metadata), over the {limit:.0f}% guard"
    return ""


def guard(store: Store, limit: float = GUARD) -> list[str]:
    """Drop this system's base snapshots from every thin pool over ``limit``; the alerts it raised.
    A group whose lock is held is left alone: its sync guards space itself and aborts on a full pool."""
    alerts = []
    with lvm.reports():
        for g in store.groups():
            if not g.sends or not g.generation:
                continue
            pressed: dict[str, str] = {}
            for v in store.volumes(g.name):
                if v.backend != "thin":
                    continue
                try:
                    lv = lvm.by_path(v.local)
                    pool = lvm.get(lv.vg, lv.pool) if lv.pool else None
                except RcopyError:
                    continue
                why = pressure(pool.data_percent, pool.metadata_percent, limit) if pool else ""
                if why:
                    pressed[v.name] = f"thin pool {lv.vg}/{lv.pool} {why}"
            if not pressed:
                continue
            fd = store.try_lock(g.name)
            if fd is None:
                continue
            try:
                vols = [v for v in store.volumes(g.name) if v.name in pressed]
                snaps = cycle.bases(g, vols, g.generation)
                if backends.delete(snaps):
                    alert = (f"{sorted(set(pressed.values()))[0]}: rcopy dropped its snapshots there "
                             f"({', '.join(name for _, _, name in snaps)}) so the applications keep writing; "
                             f"the next sync of {g.name} is full")
                    alerts_.raise_(store, "space", g.name, f"group {g.name}: {alert}", g.name)
                    alerts.append(alert)
            finally:
                os.close(fd)
    return alerts
