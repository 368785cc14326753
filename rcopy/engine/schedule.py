"""When the next periodic sync starts, and when a sync outlasted its period. Pure: times in, times out.

3PAR periodic mode: a resync starts every period; when one outlasts the period the next starts as soon
as it ends (never two at once), and an alert is raised (policy ``over_per_alert``, on unless the group
has ``no_over_per_alert``, as on 3PAR). Hence
``next = max(previous start + period, previous end)``; no period means manual syncs only.
"""
from __future__ import annotations

import os

from rcopy.model import RECOVERABLE, Group, GroupState, format_period

# seconds between auto_recover's looks at a target that stays unreachable; a link the kernel reports up
# ends the wait at once (the daemon's carrier watch)
RECOVER_RETRY = float(os.environ.get("RCOPY_RECOVER_RETRY", "30"))


def next_start(period: int | None, prev_start: float, prev_end: float) -> float | None:
    """The start time of the next periodic sync, or None without a period."""
    if not period:
        return None
    return max(prev_start + period, prev_end)


def over_period(period: int | None, start: float, end: float) -> bool:
    return bool(period) and end - start > period


def over_period_alert(g: Group, start: float, end: float) -> str:
    """The alert text for a sync that outlasted the period, or "" (none, or no_over_per_alert)."""
    if "no_over_per_alert" in g.policies or not over_period(g.period, start, end):
        return ""
    return (f"sync point {g.generation} took {end - start:.0f} s, longer than the period "
            f"{format_period(g.period)}: the recovery point is older than planned")


def due(g: Group, now: float, live: bool = False) -> bool:
    """Should the daemon start a periodic sync of this (primary, started) group now? ``live``: a process
    holds the group's lock (a sync really runs). A sync recorded in flight that nobody runs is a crash
    left behind: a started group syncs at once (the run reconciles it first, then goes on)."""
    if g.state is not GroupState.STARTED or not g.generation:
        return False
    if g.syncing:
        return not live
    when = next_start(g.period, g.last_sync_start, g.last_sync_end)
    return when is not None and now >= when


def needs_settle(g: Group, live: bool) -> bool:
    """A group that is not started but has a sync recorded in flight that nobody runs: reconcile it
    (finish or roll back) without syncing."""
    return g.syncing and not live and g.state is not GroupState.STARTED


def should_recover(g: Group, now: float, last_attempt: float) -> bool:
    """auto_recover: a group stopped because its target or links were lost, or because rcopy died
    mid-sync, is retried when links are back; device, space and state faults and an administrator's
    stop wait for the administrator (3PAR restarts only after link recovery)."""
    return ("auto_recover" in g.policies and g.state is GroupState.STOPPED and g.generation > 0
            and g.fault in RECOVERABLE and now - last_attempt >= RECOVER_RETRY)
