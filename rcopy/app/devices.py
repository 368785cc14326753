"""The daemon's device watch: a sending group whose volume's device is removed, resized or made read-only
stops with the reason, before its next sync tries to cut it.

Each daemon loop looks at every sending group's volumes (``nodes.presence``: stat and sysfs, no exec), and
a pyudev monitor wakes the loop at once when a block device changes (rcopy.app.service). A fault raises a
``device`` alert on the volume and stops the group with fault ``device``, which auto_recover never
retries: the administrator brings the device back as it was admitted and starts the group. The lock is
taken only when a fault is seen (a group syncing right now is left to fail on the device by itself; the
next loop records why), so the watch never makes an administrator's ``rcopy sync`` busy.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from rcopy.app import alerts
from rcopy.errors import DeviceError
from rcopy.model import GroupState, VolumePair
from rcopy.state import Store
from rcopy.sys import nodes


def fault(v: VolumePair, seen: nodes.Presence) -> str:
    """Why ``v`` can not be replicated as admitted, or "" when its device is as it was."""
    if not seen.present:
        return f"device {v.local} of volume {v.name} is gone (removed or deactivated)"
    if seen.size != v.size:
        return f"device {v.local} of volume {v.name} is now {seen.size} bytes, admitted at {v.size}"
    if seen.read_only:
        return f"device {v.local} of volume {v.name} became read-only"
    return ""


class DeviceChanged(DeviceError):
    """group {group} stopped: {why}: bring it back as admitted, then 'rcopy group start {group}'"""


def require(store: Store, group: str, look: Callable[[str], nodes.Presence] = nodes.presence, *,
            record: bool = True) -> None:
    """Before a sync cuts (the caller holds the lock): a volume whose device is gone or resized stops the
    group with its reason (DeviceChanged) instead of failing half-way through the send. A read-only
    source is no fault for a sync, which only reads it (recover sends from a side it protects).
    ``record=False``: refuse only (a request judged before its background run takes the lock)."""
    for v in store.volumes(group):
        seen = look(v.local)
        why = fault(v, dataclasses.replace(seen, read_only=False))
        if record and (why or not seen.read_only):
            _alert(store, group, v, why)
        if why:
            if record:
                _record(store, group, why)
            raise DeviceChanged(group=group, why=why)


def check(store: Store, look: Callable[[str], nodes.Presence] = nodes.presence) -> list[tuple[str, str]]:
    """Raise or clear each sending group's device alerts; stop each group with a faulty device.
    Returns (group, reason) for each group stopped now."""
    stopped = []
    for g in store.groups():
        if not g.sends or g.state is GroupState.NEW:
            continue
        faults = []
        for v in store.volumes(g.name):
            why = fault(v, look(v.local))
            _alert(store, g.name, v, why)
            if why:
                faults.append(why)
        if faults and not (g.state is GroupState.STOPPED and g.fault == "device"):
            reason = _stop(store, g.name, faults[0])
            if reason:
                stopped.append((g.name, reason))
    return stopped


def _alert(store: Store, group: str, v: VolumePair, why: str) -> None:
    """The volume's ``device`` alert raised with ``why``, or cleared when ``why`` is empty."""
    if why:
        alerts.raise_(store, "device", f"{group}/{v.name}", why, group)
    else:
        alerts.clear(store, "device", f"{group}/{v.name}", "the device is back as admitted")


def _stop(store: Store, group: str, why: str) -> str:
    fd = store.try_lock(group)
    if fd is None:                           # a sync or an operation runs: it meets the device itself
        return ""
    try:
        if store.group(group).syncing:       # a crash left behind: the daemon's reconcile settles it first
            return ""
        return _record(store, group, why)
    finally:
        os.close(fd)


def _record(store: Store, group: str, why: str) -> str:
    g = store.group(group)
    reason = f"{why}: bring it back as admitted, then 'rcopy group start {group}'"
    store.put_group(dataclasses.replace(g, state=GroupState.STOPPED, reason=reason, fault="device"))
    return reason
