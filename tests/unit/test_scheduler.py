"""The periodic schedule: next = max(previous start + period, previous end), the over-period alert,
auto_recover, and the daemon's tick with a fake sync."""
import dataclasses
import os
import subprocess
import sys
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


def test_over_period_alert_is_on_unless_no_over_per_alert():
    g = Group("g", "t", period=60, generation=4, policies=frozenset({"over_per_alert"}))
    assert "longer than the period 1m" in scheduler.over_period_alert(g, 0, 61)
    assert scheduler.over_period_alert(g, 0, 60) == ""
    assert "longer than the period" in scheduler.over_period_alert(Group("g", "t", period=60), 0, 600)
    assert scheduler.over_period_alert(Group("g", "t", period=60, policies=frozenset({"no_over_per_alert"})), 0, 600) == ""


def test_due_only_for_started_idle_groups_with_a_period():
    g = Group("g", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=100, last_sync_end=110)
    assert not scheduler.due(g, 159) and scheduler.due(g, 160)
    assert not scheduler.due(Group("g", "t", state=GroupState.STARTED, generation=1), 10 ** 9)
    assert not scheduler.due(Group("g", "t", period=60, state=GroupState.STOPPED, generation=1), 10 ** 9)


def test_auto_recover_retries_link_and_interrupted_faults_only():
    def stopped(fault):
        return Group("g", "t", state=GroupState.STOPPED, reason="x", generation=2, fault=fault,
                     policies=frozenset({"auto_recover"}))
    assert scheduler.should_recover(stopped("link"), 100, 0)
    assert scheduler.should_recover(stopped("interrupted"), 100, 0)
    assert not scheduler.should_recover(stopped("link"), 100, 90)                 # retried 10 s ago
    for fault in ("admin", "device", "space", "state", "auth", "failed"):         # wait for the admin (3PAR)
        assert not scheduler.should_recover(stopped(fault), 100, 0), fault
    no_policy = Group("g", "t", state=GroupState.STOPPED, generation=2, fault="link")
    assert not scheduler.should_recover(no_policy, 100, 0)


def test_a_crashed_sync_is_never_stuck():
    """Issue 11 #1: a sync recorded in flight that nobody runs (the primary died) is due at once for a
    started group (the run reconciles first) and settled for any other; a live one is left alone."""
    crashed = Group("g", "t", period=3600, state=GroupState.STARTED, generation=3, pending_generation=4,
                    pending_id="x", last_sync_start=100, last_sync_end=110)
    assert scheduler.due(crashed, 120, live=False) and not scheduler.due(crashed, 120, live=True)
    assert not scheduler.needs_settle(crashed, live=False)
    stopped = dataclasses.replace(crashed, state=GroupState.STOPPED)
    assert not scheduler.due(stopped, 120) and scheduler.needs_settle(stopped, live=False)
    assert not scheduler.needs_settle(stopped, live=True)


class _Report:
    generation, bytes_sent, seconds = 2, 0, 0.0


def test_service_tick_starts_due_syncs_and_recovers_when_links_return(tmp_path):
    store = Store(str(tmp_path / "A"))
    store.add_target(Target("t", ("192.0.2.1",)))
    store.add_group(Group("due", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=0,
                          last_sync_end=5))
    store.add_group(Group("idle", "t", period=60, state=GroupState.STARTED, generation=1, last_sync_start=990))
    store.add_group(Group("down", "t", state=GroupState.STOPPED, reason="link lost", generation=1, fault="link",
                          policies=frozenset({"auto_recover"})))
    store.add_group(Group("crashed", "t", state=GroupState.STOPPED, generation=1, pending_generation=2,
                          pending_id="x"))
    store.add_group(Group("sec", "p", role=Role.SECONDARY, period=60, state=GroupState.STARTED, generation=1))
    calls, lock = [], threading.Lock()

    def sync(group):
        with lock:
            calls.append(group)
        if group == "down":
            raise LinkError("still down")
        return _Report()

    up = {"v": False}
    settled = []

    def settle(group):                   # as session.settle: reconcile rolls the crashed sync back
        settled.append(group)
        store.abort_sync(group, "interrupted", fault="interrupted")
    svc = Service(store, sync, settle=settle, probe=lambda link: up["v"], clock=lambda: 1000.0)
    assert sorted(svc.tick()) == [("crashed", "reconcile"), ("due", "period")]
    svc.wait()
    up["v"] = True
    svc.recover_attempt.clear()
    assert ("down", "auto_recover") in svc.tick()
    svc.wait()
    assert sorted(calls) == ["down", "due", "due"] and settled == ["crashed"]
    # within RECOVER_RETRY of that attempt nothing is retried, unless the carrier watch saw a link come up
    assert not [w for g, w in svc.tick() if g == "down"]
    svc.wait()
    svc.carrier_up("eth1")
    assert svc.wake.is_set()
    assert ("down", "auto_recover: eth1 came up") in svc.tick()
    svc.wait()
    assert not [w for g, w in svc.tick() if g == "down"]        # one attempt per event
    svc.wait()
    assert [l.state.value for l in store.links("t")] == ["up"]
    store.close()


def test_rtnetlink_link_messages_are_parsed_and_an_up_transition_fires_once():
    import struct
    from rcopy.sys import netlink

    def attr(kind, value):
        raw = struct.pack("=HH", 4 + len(value), kind) + value
        return raw + b"\0" * (-len(raw) % 4)

    def newlink(name, oper, kind=netlink.RTM_NEWLINK):
        body = struct.pack("=BxHiII", 0, 1, 2, 0, 0) + attr(netlink.IFLA_IFNAME, name.encode() + b"\0") \
            + attr(netlink.IFLA_OPERSTATE, bytes([oper]))
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body

    data = newlink("eth1", netlink.IF_OPER_UP) + newlink("eth2", 2) + newlink("eth9", 6, kind=24)
    assert netlink.link_states(data) == [("eth1", True), ("eth2", False)]
    assert netlink.link_states(data[:30]) == []                   # a torn message is dropped, not misread

    class _Sock:
        def settimeout(self, t): pass
        def recv(self, n): raise OSError(9, "closed")
        def close(self): pass
    seen = []
    w = netlink.CarrierWatch(seen.append, sock=_Sock())
    for name, up in [("eth1", False), ("eth1", True), ("eth1", True), ("eth1", False), ("eth1", True)]:
        w.seen(name, up)
    w.stop()
    assert seen == ["eth1", "eth1"] and not w.thread.is_alive()


def test_the_carrier_watch_hears_a_real_interface_come_up(tmp_path):
    """A veth pair in a network namespace of its own (unshare): the kernel's events, not a fake."""
    script = tmp_path / "watch.py"
    script.write_text(
        "import subprocess, time\n"
        "from rcopy.sys.netlink import CarrierWatch\n"
        "seen = []\n"
        "w = CarrierWatch(seen.append)\n"
        "subprocess.run('ip link add rcv0 type veth peer name rcv1 && ip link set rcv0 up && ip link set rcv1 up',"
        " shell=True, check=True)\n"
        "for _ in range(400):\n"
        "    if {'rcv0', 'rcv1'} <= set(seen): break\n"
        "    time.sleep(0.05)\n"
        "w.stop()\n"
        "print(sorted(set(seen)))\n")
    r = subprocess.run(["unshare", "--net", sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "['rcv0', 'rcv1']"


def test_the_space_guard_names_what_is_over_and_nothing_under():
    from rcopy.app.space import pressure
    assert pressure(89.9, 10, 90) == ""
    assert "90% full (data)" in pressure(90, 10, 90)
    assert "95% full (metadata)" in pressure(10, 95, 90)


def test_the_daemon_guards_space_on_its_own_beat():
    from rcopy.app.service import Service
    calls, now = [], [100.0]
    s = Service(None, lambda g: None, guard=lambda: calls.append(now[0]) or ["alert"], guard_every=5,
                clock=lambda: now[0])
    assert s.guard_space() == ["alert"]
    now[0] = 103
    assert s.guard_space() == [] and calls == [100.0]
    now[0] = 105.5
    s.guard_space()
    assert calls == [100.0, 105.5]
