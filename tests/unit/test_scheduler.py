"""The periodic schedule: next = max(previous start + period, previous end), the over-period alert,
auto_recover, and the daemon's tick with a fake sync."""
import threading

import pytest

from rcopy.engine import schedule as scheduler
from rcopy.app.service import Service
from rcopy.errors import LinkError
from rcopy.model import Group, GroupState, Role, Target
from rcopy.state import Store


@pytest.mark.parametrize("period, start, end, expected", [
    (300, 1000, 1010, 1300),      # on time: one period after the previous start
    (300, 1000, 1450, 1450),      # outlasted the period: right after it ended, never two at once
    (300, 1000, 1300, 1300),      # exactly one period long
    (None, 1000, 1010, None),     # no period: manual only
])
def test_next_start_rule(period, start, end, expected):
    assert scheduler.next_start(period, start, end) == expected


def test_over_period_alert_needs_the_policy():
    g = Group("g", "t", period=60, generation=4, policies=frozenset({"over_per_alert"}))
    assert "longer than the period 1m" in scheduler.over_period_alert(g, 0, 61)
    assert scheduler.over_period_alert(g, 0, 60) == ""
    assert scheduler.over_period_alert(Group("g", "t", period=60), 0, 600) == ""


def test_due_only_for_started_idle_groups_with_a_period():
    g = Group("g", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=100, last_sync_end=110)
    assert not scheduler.due(g, 159) and scheduler.due(g, 160)
    assert not scheduler.due(Group("g", "t", state=GroupState.STARTED, generation=1), 10 ** 9)
    assert not scheduler.due(Group("g", "t", period=60, state=GroupState.STOPPED, generation=1), 10 ** 9)


def test_auto_recover_retries_failures_not_admin_stops():
    failed = Group("g", "t", state=GroupState.STOPPED, reason="sync point 3 link lost: x", generation=2,
                   policies=frozenset({"auto_recover"}))
    assert scheduler.should_recover(failed, 100, 0)
    assert not scheduler.should_recover(failed, 100, 90)                    # retried 10 s ago
    admin = Group("g", "t", state=GroupState.STOPPED, reason="stopped by the administrator", generation=2,
                  policies=frozenset({"auto_recover"}))
    assert not scheduler.should_recover(admin, 100, 0)


class _Report:
    generation, bytes_sent, seconds = 2, 0, 0.0


def test_service_tick_starts_due_syncs_and_recovers_when_links_return(tmp_path):
    store = Store(str(tmp_path / "A"))
    store.add_target(Target("t", ("192.0.2.1",)))
    store.add_group(Group("due", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=0,
                          last_sync_end=5))
    store.add_group(Group("idle", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=990))
    store.add_group(Group("down", "t", state=GroupState.STOPPED, reason="link lost", generation=1,
                          policies=frozenset({"auto_recover"})))
    store.add_group(Group("sec", "p", role=Role.SECONDARY, period=60, state=GroupState.STARTED, generation=1))
    calls, lock = [], threading.Lock()

    def sync(group):
        with lock:
            calls.append(group)
        if group == "down":
            raise LinkError("still down")
        return _Report()

    up = {"v": False}
    svc = Service(store, sync, probe=lambda link: up["v"], clock=lambda: 1000.0)
    assert svc.tick() == [("due", "period")]
    svc.wait()
    up["v"] = True
    svc.recover_attempt.clear()
    assert ("down", "auto_recover") in svc.tick()
    svc.wait()
    assert sorted(calls) == ["down", "due", "due"]
    assert [l.state.value for l in store.links("t")] == ["up"]
    store.close()
