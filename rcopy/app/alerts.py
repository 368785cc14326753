"""Alerts as 3PAR has them: raised when a condition starts, recorded in state, cleared when it ends.

One model for every kind (rcopy.model.ALERT_KINDS), each an ``alerts`` row (kind, object, group,
message, since) that ``rcopy status alerts`` lists and ``rcopy metrics`` counts:

| kind | object | raised when | cleared when |
| --- | --- | --- | --- |
| over_period | group | a sync runs or ran longer than the period (policy over_per_alert, the default) | a sync commits within the period |
| link_down | target/address | a link was found down (a failed connect, the daemon's route probe) | that link answers again |
| target_failed | target | every link of the target is down, the last for the target's timeout (200 s) | any link answers again |
| stale | group/volume | a volume is stale or failed (a read error; its next sync is full) | the volume is synced again |
| space | group | the space guard dropped the group's base snapshots from a full thin pool (rcopy.app.space) | the group's next sync commits (new bases) |
| device | group/volume | a sending group's volume device is gone, resized or read-only (rcopy.app.devices; the group stops) | the device is back as admitted |

Each newly raised alert goes to syslog (``syslog.syslog``, ident ``rcopy``, facility daemon) at
LOG_WARNING (over_period, link_down, stale) or LOG_ERR (target_failed, space, device), and its clearing at
LOG_NOTICE, whichever process raised it (the daemon, or an administrator's ``rcopy sync``): journald
keeps them with that priority (``journalctl -t rcopy -p warning``). They are also logged on the
``rcopy.alerts`` logger at INFO (the daemon's stderr), never on a command's stderr, whose errors stay
one line.
"""
from __future__ import annotations

import dataclasses
import logging
import syslog
import time

from rcopy.engine import schedule
from rcopy.model import Alert, GroupState, LinkState, VolumeState, format_period
from rcopy.state import Store

log = logging.getLogger("rcopy.alerts")

PRIORITY = {"over_period": syslog.LOG_WARNING, "link_down": syslog.LOG_WARNING, "stale": syslog.LOG_WARNING,
            "target_failed": syslog.LOG_ERR, "space": syslog.LOG_ERR,
            "device": syslog.LOG_ERR}


def to_syslog(priority: int, text: str) -> None:
    """One line to syslog as ident rcopy, facility daemon (what journald keeps with its priority)."""
    syslog.openlog("rcopy", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(priority, text)


def raise_(store: Store, kind: str, obj: str, message: str, group: str = "") -> bool:
    """Record the alert; when it is new, send it to syslog. True when new."""
    new = store.raise_alert(kind, obj, message, group)
    if new:
        text = f"ALERT {kind} {obj}: {message}"
        to_syslog(PRIORITY[kind], text)
        log.info("%s", text)
    return new


def clear(store: Store, kind: str, obj: str, why: str = "") -> Alert | None:
    """The condition ended: drop the alert (syslog LOG_NOTICE). The alert cleared, or None."""
    a = store.clear_alert(kind, obj)
    if a is not None:
        text = f"alert cleared: {kind} {obj}" + (f" ({why})" if why else "")
        to_syslog(syslog.LOG_NOTICE, text)
        log.info("%s", text)
    return a


def after_sync(store: Store, group: str) -> None:
    """A sync point of ``group`` committed: raise or clear over_period; new bases end a space alert."""
    g = store.group(group)
    text = schedule.over_period_alert(g, g.last_sync_start, g.last_sync_end)
    if text:
        raise_(store, "over_period", group, f"group {group}: {text}", group)
    else:
        clear(store, "over_period", group, f"sync point {g.generation} within the period")
    clear(store, "space", group, f"sync point {g.generation} made new base snapshots")


def _say_target_failed(store: Store, t) -> None:
    """A group stopped by its lost links says so in its own reason once the target has failed (what
    3PAR's showrcopy shows); the fault stays "link", so auto_recover still resumes it."""
    for g in store.groups():
        if g.target == t.name and g.state is GroupState.STOPPED and g.fault == "link" \
                and not g.reason.startswith("target failed"):
            store.put_group(dataclasses.replace(
                g, reason=f"target failed: {t.name} unreachable on every link for {t.target_timeout} s or more "
                          f"({g.reason})"))


def refresh(store: Store, now: float | None = None) -> None:
    """Raise or clear the alerts that follow recorded states: links, targets, stale volumes, and a sync
    still in flight past its period (raised at once, as 3PAR does; cleared by the next sync that commits
    within the period, rcopy.app.alerts.after_sync)."""
    now = time.time() if now is None else now
    for t in store.targets():
        links = store.links(t.name)
        for link in links:
            obj = f"{t.name}/{link.address}"
            if link.state is LinkState.DOWN:
                raise_(store, "link_down", obj, f"link {link.address} to target {t.name} is down")
            elif link.state is LinkState.UP:
                clear(store, "link_down", obj, "the link answers")
        down = [link for link in links if link.state is LinkState.DOWN]
        if links and len(down) == len(links) and now - max(link.since for link in down) >= t.target_timeout:
            raise_(store, "target_failed", t.name, f"target {t.name} is unreachable on every link for "
                                                   f"{t.target_timeout} s or more (its target timeout)")
            _say_target_failed(store, t)
        elif any(link.state is LinkState.UP for link in links):
            clear(store, "target_failed", t.name, "a link answers")
    for g in store.groups():
        if g.sends and g.pending_generation and g.last_sync_start \
                and schedule.over_period_alert(g, g.last_sync_start, now):
            raise_(store, "over_period", g.name,
                   f"group {g.name}: sync point {g.pending_generation} has run {now - g.last_sync_start:.0f} s, "
                   f"longer than the period {format_period(g.period)}: the recovery point is older than planned",
                   g.name)
        for v in store.volumes(g.name):
            obj = f"{g.name}/{v.name}"
            if v.state in (VolumeState.STALE, VolumeState.FAILED):
                raise_(store, "stale", obj, f"volume {v.name} ({v.local}) of group {g.name} is {v.state.value}: "
                                            "its next sync is full", g.name)
            elif v.state is VolumeState.SYNCED:
                clear(store, "stale", obj, "synced again")
