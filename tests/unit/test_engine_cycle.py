"""The sync cycle with fakes: design.md §2.3-2.5 rules as unit tests (rollback on interrupt, full sync
when the base is missing or refused, refusal while a sync runs, two-phase commit order, reconcile after
a crash in every window). The backup is the real Agent over its own Store; see engine_fakes.py."""
import dataclasses
import os
import types

import pytest

from rcopy.engine import driver as driver_mod
from rcopy.engine.cycle import PeerView, plan_sync, reconcile
from rcopy.engine import plan as P
from rcopy.engine.states import Event, transition
from rcopy.errors import Busy, LinkError, Refused, SyncFailed
from rcopy.model import Group, GroupState, Role, VolumePair, VolumeState
from rcopy.state import Store
from rcopy import faults

from tests.unit.engine_fakes import (Crash, FakeExport, FakeSender, FakeSnapshotter, LocalPeer, make_agent,
                                     make_driver)

SIZE = 64 * 4096
VOLS = {"/p/a": "/b/a", "/p/b": "/b/b"}


class Rig:
    """A primary and a backup in one process: two stores, two sets of in-memory disks."""

    def __init__(self, tmp_path):
        self.log = []
        self.a = Store(str(tmp_path / "A"))
        self.b = Store(str(tmp_path / "B"))
        self.pdisks = {p: bytearray(os.urandom(SIZE // 2) + bytes(SIZE // 2)) for p in VOLS}
        self.bdisks = {s: bytearray(SIZE) for s in VOLS.values()}
        self.psnap = FakeSnapshotter(self.pdisks)
        self.psnap.calls = self.log
        self.bsnap = FakeSnapshotter(self.bdisks)
        self.sender = FakeSender(self.psnap, self.bdisks, self.log)
        self.a.add_group(Group("g", "backup"))
        self.b.add_group(Group("g", "primary", role=Role.SECONDARY))
        for p, s in VOLS.items():
            name = p.rsplit("/", 1)[1]
            self.a.add_volume(VolumePair("g", name, p, s, SIZE, backend="fake"))
            self.b.add_volume(VolumePair("g", name, s, p, SIZE, backend="fake"))
        self.connect()

    def connect(self):
        """A new primary process and a new agent (which first recovers what a dead one left)."""
        self.agent = make_agent(self.b, self.bsnap, lambda vols, bind, cert="", granule=0, **links: FakeExport(vols, bind, self.bdisks))
        self.agent.recover()
        self.peer = LocalPeer(self.agent, self.log)
        self.driver = make_driver(self.a, self.peer, self.psnap, self.sender)

    def sync(self, event=Event.SYNC, full=""):
        self.driver.reconcile("g")
        return self.driver.sync("g", event=event, full=full)

    def write(self, path, offset, data):
        self.pdisks[path][offset:offset + len(data)] = data

    def assert_consistent(self):
        """Backup and primary agree on one committed sync point and every secondary equals P(n)."""
        ga, gb = self.a.group("g"), self.b.group("g")
        assert (ga.generation, ga.sync_id) == (gb.generation, gb.sync_id)
        assert not ga.pending_generation and not gb.pending_generation
        for p, s in VOLS.items():
            name = p.rsplit("/", 1)[1]
            assert bytes(self.bdisks[s]) == self.psnap.snaps[(p, f"rcopy.g.{name}.P{ga.generation}")]
        kept = sorted(n for (_, n) in self.psnap.snaps)
        assert kept == [f"rcopy.g.{p.rsplit('/', 1)[1]}.P{ga.generation}" for p in VOLS]
        assert not self.bsnap.snaps, "rollback snapshots left on the backup"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.a.close()
    r.b.close()


def test_initial_full_then_delta_of_changed_blocks(rig):
    rep = rig.sync(Event.START)
    assert rep.generation == 1 and all(why == "initial sync" for _, why in rep.volumes.values())
    assert rep.bytes_sent == len(VOLS) * SIZE // 2          # zero half travels as write-zeroes
    rig.assert_consistent()
    rig.write("/p/a", 4096 * 3, os.urandom(4096))
    rig.write("/p/b", 4096 * 40, os.urandom(8192))
    rep = rig.sync()
    assert rep.volumes == {"a": (4096, ""), "b": (8192, "")}
    rig.assert_consistent()
    assert [v.state for v in rig.a.volumes("g")] == [VolumeState.SYNCED] * 2
    assert rig.a.group("g").state is GroupState.STARTED


def test_link_lost_mid_sync_rolls_back_every_secondary_and_next_sync_is_a_delta(rig):
    rig.sync(Event.START)
    before = {s: bytes(d) for s, d in rig.bdisks.items()}
    rig.write("/p/a", 0, os.urandom(4096))
    rig.write("/p/b", 0, os.urandom(4096))
    rig.sender.fail_on = "/b/b"
    with pytest.raises(SyncFailed, match="link lost"):
        rig.sync()
    assert {s: bytes(d) for s, d in rig.bdisks.items()} == before      # never a mix: both at point 1
    g = rig.a.group("g")
    assert g.state is GroupState.STOPPED and "link lost" in g.reason and g.generation == 1
    assert rig.b.group("g").generation == 1
    assert ("/p/a", "rcopy.g.a.P1") in rig.psnap.snaps and ("/p/a", "rcopy.g.a.P2") not in rig.psnap.snaps
    # b's send failed in the middle of its change scan: the scan let go of b's snapshots, so the abort
    # removed the half-sent P2 of b as well (an open scan kept it, and a dm-snapshot, for good)
    assert ("/p/b", "rcopy.g.b.P2") not in rig.psnap.snaps and not +rig.psnap.readers
    rig.sender.fail_on = None
    rep = rig.sync()
    assert rep.generation == 2 and rep.volumes == {"a": (4096, ""), "b": (4096, "")}
    rig.assert_consistent()


def test_missing_base_makes_that_volume_full_with_reason(rig):
    rig.sync(Event.START)
    del rig.psnap.snaps[("/p/a", "rcopy.g.a.P1")]
    rep = rig.sync()
    assert "base snapshot rcopy.g.a.P1 is missing" in rep.volumes["a"][1]
    assert rep.volumes["b"] == (0, "")
    assert "missing" in {v.name: v for v in rig.a.volumes("g")}["a"].full_reason
    rig.assert_consistent()


def test_invalid_base_makes_a_full_sync(rig):
    rig.sync(Event.START)
    rig.psnap.invalid.add("rcopy.g.b.P1")
    rep = rig.sync()
    assert "no longer usable" in rep.volumes["b"][1] and rep.volumes["a"][1] == ""
    rig.assert_consistent()


def test_backup_not_holding_the_base_refuses_the_delta(rig):
    rig.sync(Event.START)
    rig.b.update_group("g", sync_id="someone-else")      # e.g. the backup's state was restored from elsewhere
    rig.write("/p/a", 0, os.urandom(4096))
    rep = rig.sync()
    assert all("does not hold sync point 1" in why for _, why in rep.volumes.values())
    assert rep.bytes_sent == len(VOLS) * SIZE // 2
    rig.assert_consistent()


def test_forced_full(rig):
    rig.sync(Event.START)
    rep = rig.sync(full="full sync requested by the administrator")
    assert all(why.startswith("full sync requested") for _, why in rep.volumes.values())


def test_sync_refused_while_one_runs(rig, monkeypatch):
    """A second sync of a group while one runs is refused (Busy), by the lock and by the driver itself;
    the running one is not disturbed and commits."""
    import threading
    rig.sync(Event.START)
    sending, release = threading.Event(), threading.Event()
    real_send = rig.sender.send

    def held_send(*a, **kw):
        sending.set()
        release.wait(10)
        return real_send(*a, **kw)

    monkeypatch.setattr(rig.sender, "send", held_send)
    result = {}

    def first():
        with rig.a.lock("g"):
            result["report"] = rig.driver.sync("g")
    t = threading.Thread(target=first)
    t.start()
    assert sending.wait(10)
    with pytest.raises(Busy):                    # a second process: the group lock is held
        with rig.a.lock("g"):
            pass
    with pytest.raises(Busy, match="is syncing sync point 2"):
        rig.driver.sync("g")                     # the driver itself refuses: sync point 2 is in flight
    release.set()
    t.join(10)
    assert result["report"].generation == 2
    rig.assert_consistent()


def test_backup_refuses_a_second_begin(rig):
    rig.peer.begin("g", 1, "x", 0, "", list(VOLS.values()), "127.0.0.1")
    with pytest.raises(Busy):
        rig.peer.begin("g", 1, "y", 0, "", list(VOLS.values()), "127.0.0.1")


def test_sync_on_a_never_started_group_and_admit_while_started_are_refused(rig):
    with pytest.raises(Refused, match="never started"):
        rig.driver.sync("g")
    rig.sync(Event.START)
    with pytest.raises(Refused, match="stop it first"):
        transition(rig.a.group("g"), Event.ADMIT)
    with pytest.raises(Refused, match="secondary"):
        transition(rig.b.group("g"), Event.SYNC)


def test_two_phase_commit_order(rig, monkeypatch):
    rig.sync(Event.START)
    seen = {}
    real_commit = rig.peer.commit

    def commit(*a):
        seen["primary_generation_at_backup_commit"] = rig.a.group("g").generation
        return real_commit(*a)

    monkeypatch.setattr(rig.peer, "commit", commit)
    rig.write("/p/a", 0, b"x" * 4096)
    del rig.log[:]
    rig.sync()
    kinds = [e[0] if e[0] != "peer" else e[1] for e in rig.log]
    assert kinds.index("begin") < kinds.index("cut") < kinds.index("send") < kinds.index("commit")
    assert kinds.index("commit") < kinds.index("delete")          # P(n) goes only after both committed
    assert seen["primary_generation_at_backup_commit"] == 1       # backup first, then the primary
    assert rig.a.group("g").generation == 2


def test_a_sync_with_nothing_written_confirms_the_sync_point_without_a_snapshot(rig):
    """Issue 15: nothing written to any volume since sync point n was cut: n is the group's image now.
    No begin, cut, send or new sync point; n's cut time moves to this check (the lag restarts), and
    the next write makes the next sync a delta from the same base."""
    rig.sync(Event.START)
    cut1 = rig.a.committed_point("g").cut
    del rig.log[:]
    report = rig.sync()
    assert report.generation == 1 and report.plan == [f"1. {P.Confirm('g', 1, rig.a.group('g').sync_id).describe()}"]
    assert set(report.phases) == {"check"} and report.volumes == {"a": (0, ""), "b": (0, "")}
    assert [e for e in rig.log if e[0] != "peer" or e[1] not in ("status",)] == []   # asked, changed nothing
    g = rig.a.group("g")
    assert g.generation == 1 and g.state is GroupState.STARTED and rig.a.committed_point("g").cut > cut1
    assert rig.b.group("g").generation == 1
    rig.assert_consistent()
    rig.write("/p/b", 4096, b"y" * 4096)
    report = rig.sync()
    assert report.generation == 2 and report.volumes["b"] == (4096, "") and report.volumes["a"] == (0, "")
    rig.assert_consistent()
    assert rig.sync().confirmed and rig.a.group("g").generation == 2     # quiet again, past reconcile's cleanup


def test_one_volume_written_cuts_the_whole_group_and_full_never_confirms(rig):
    rig.sync(Event.START)
    rig.write("/p/a", 0, b"z" * 4096)
    assert rig.sync().generation == 2            # b unchanged, a written: one new sync point for both
    rig.assert_consistent()
    assert rig.sync(full="sync --full").generation == 3
    rig.assert_consistent()
    assert "nothing written" in P.render(rig.driver.plan("g"))          # --dry-run says the same
    assert "full sync" in P.render(rig.driver.plan("g", full="sync --full"))


def test_a_backup_that_does_not_hold_the_sync_point_is_never_confirmed(rig):
    rig.sync(Event.START)
    rig.b.put_group(dataclasses.replace(rig.b.group("g"), sync_id="other"))   # the backup lost its state
    rig.connect()
    report = rig.sync()
    assert report.generation == 2 and all("does not hold" in why for _, why in report.volumes.values())
    rig.assert_consistent()


def test_plan_is_data_and_says_full_or_delta():
    g = Group("g", "t", generation=3, sync_id="abc", state=GroupState.STARTED)
    vols = [VolumePair("g", "a", "/p/a", "/b/a", 1, state=VolumeState.SYNCED, last_sync=1.0),
            VolumePair("g", "b", "/p/b", "/b/b", 1, state=VolumeState.NEW)]
    view = PeerView(generation=3, sync_id="abc", volumes={"/b/a": "synced", "/b/b": "synced"})
    plan = plan_sync(g, vols, 4, "new", {"a": None, "b": None}, view)
    assert [a.kind for a in plan] == ["RecordBegin", "PeerBegin", "Cut", "PeerBegun", "Send", "Send",
                                      "PeerCommit", "Commit", "DeleteSnapshots", "PeerTidied"]
    assert plan[4].base == "rcopy.g.a.P3" and plan[4].source == "rcopy.g.a.P4"
    assert plan[5].base is None and "new" in plan[5].reason
    assert "full sync" in P.render(plan)
    # the backup's facts decide too: a secondary it does not hold at sync point 3 goes full
    other = plan_sync(g, vols, 4, "new", {"a": None, "b": None}, PeerView(generation=3, sync_id="zzz"))
    assert other[4].base is None and "does not hold sync point 3" in other[4].reason


# -- crash windows: the process dies (no abort, no cleanup), restarts, reconciles, converges -------------
PRIMARY_POINTS = ["after-record-begin", "after-cut", "after-send", "after-peer-commit", "after-commit"]
AGENT_POINTS = ["agent-after-begin", "agent-before-commit", "agent-after-commit"]


def _crash_at(monkeypatch, point):
    def fault(p, code=99):
        if p == point:
            raise Crash(p)
    monkeypatch.setattr(faults, "point", fault)


@pytest.mark.parametrize("point", PRIMARY_POINTS)
def test_primary_killed_mid_sync_reconciles(rig, monkeypatch, point):
    rig.sync(Event.START)
    rig.write("/p/a", 8192, os.urandom(4096))
    _crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        rig.sync()
    monkeypatch.setattr(faults, "point", lambda p, code=99: None)
    rig.peer.close()                     # the primary died: the agent's stdin closes
    rig.connect()                        # primary restarted
    committed = point in ("after-peer-commit", "after-commit")
    actions = rig.driver.reconcile("g")
    assert rig.a.group("g").generation == (2 if committed else 1)
    if not committed:
        assert any(isinstance(a, P.Abort) for a in actions)
        assert "interrupted" in rig.a.group("g").reason
    rig.assert_consistent()
    rep = rig.sync()
    assert all(why == "" for _, why in rep.volumes.values())      # a delta, not a full sync
    rig.assert_consistent()


@pytest.mark.parametrize("point", AGENT_POINTS)
def test_agent_killed_mid_sync_reconciles(rig, monkeypatch, point):
    rig.sync(Event.START)
    rig.write("/p/b", 0, os.urandom(4096))
    _crash_at(monkeypatch, point)
    with pytest.raises(SyncFailed):
        rig.sync()
    monkeypatch.setattr(faults, "point", lambda p, code=99: None)
    assert rig.a.group("g").state is GroupState.STOPPED
    rig.connect()                        # next run: a new agent recovers, the primary reconciles
    rig.driver.reconcile("g")
    assert rig.a.group("g").generation == (2 if point == "agent-after-commit" else 1)
    rig.assert_consistent()
    rig.sync()
    rig.assert_consistent()


def test_reconcile_rules_are_pure():
    g = Group("g", "t", generation=1, sync_id="one", pending_generation=2, pending_id="two")
    vols = [VolumePair("g", "a", "/p/a", "/b/a", 1)]
    finish = reconcile(g, vols, PeerView(generation=2, sync_id="two"))
    assert [a.kind for a in finish] == ["Commit", "DeleteSnapshots"] and finish[1].requests[0][2] == "rcopy.g.a.P1"
    undo = reconcile(g, vols, PeerView(generation=1, sync_id="one", pending_generation=2, pending_id="two"))
    assert [a.kind for a in undo] == ["PeerAbort", "DeleteSnapshots", "Abort"]
    assert undo[1].requests[0][2] == "rcopy.g.a.P2"
    quiet = reconcile(Group("g", "t", generation=1, sync_id="one"), vols, PeerView(generation=1, sync_id="one"))
    assert quiet == []
    diverged = reconcile(Group("g", "t", generation=1, sync_id="one"), vols, PeerView(generation=0))
    assert [a.kind for a in diverged] == ["Note"] and "full" in diverged[0].text


def test_primary_pings_the_agent_from_begin_until_commit(rig, monkeypatch):
    import time as _time
    monkeypatch.setattr(driver_mod, "HEARTBEAT", 0.01)
    real_send = rig.sender.send

    def slow_send(*a, **kw):
        _time.sleep(0.2)
        return real_send(*a, **kw)

    monkeypatch.setattr(rig.sender, "send", slow_send)
    rig.sync(Event.START)
    ops = [e[1] for e in rig.log if e[0] == "peer"]
    assert "ping" in ops[ops.index("begin"):ops.index("commit")]
    assert "ping" not in ops[ops.index("commit"):]


def _silent_control_link(rig, monkeypatch, reattach):
    """The rig's channel runs on link "one" of two; its first ping fails as a silent link's does."""
    import time as _time
    monkeypatch.setattr(driver_mod, "HEARTBEAT", 0.01)
    real_send, real_ping, pings = rig.sender.send, rig.peer.ping, []

    def slow_send(*a, **kw):
        _time.sleep(0.3)
        return real_send(*a, **kw)

    def ping():
        pings.append(rig.peer.link)
        if len(pings) == 1:
            raise LinkError("no answer from the agent within 25 s: the link or the peer is down")
        return real_ping()

    cancelled = []
    monkeypatch.setattr(rig.sender, "send", slow_send)
    monkeypatch.setattr(rig.sender, "cancel", cancelled.append, raising=False)
    monkeypatch.setattr(rig.peer, "ping", ping)
    monkeypatch.setattr(rig.peer, "target", types.SimpleNamespace(links=("one", "two")), raising=False)
    monkeypatch.setattr(rig.peer, "reattach", reattach, raising=False)
    rig.peer.link = "one"
    return pings, cancelled


def test_a_silent_control_link_moves_the_channel_and_the_sync_goes_on(rig, monkeypatch):
    moved = []

    def reattach(group, sync_id, why, settled=False):
        moved.append((group, sync_id, why))
        rig.peer.link = "two"
        return "two"

    pings, cancelled = _silent_control_link(rig, monkeypatch, reattach)
    rig.sync(Event.START)
    g = rig.a.group("g")
    assert moved == [("g", g.sync_id, "no answer from the agent within 25 s: the link or the peer is down")]
    assert "two" in pings and not cancelled
    rig.assert_consistent()


def test_a_silent_control_link_no_other_link_takes_fails_the_sends_at_once(rig, monkeypatch):
    def reattach(group, sync_id, why, settled=False):
        raise LinkError("two: connection refused")

    pings, cancelled = _silent_control_link(rig, monkeypatch, reattach)
    rig.sync(Event.START)                        # the fake sender ignores cancel: the sync itself ends
    assert pings == ["one"] and len(cancelled) == 1 and "heartbeat" in cancelled[0]


def test_a_begin_or_commit_answer_lost_with_the_control_link_is_asked_again_over_the_other(rig, monkeypatch):
    """The link dies with begin's answer (the backup begun) or commit's (the backup committed): the
    channel moves and the same request is asked again: begin answers its exports again, commit answers
    "committed" (both idempotent for the sync in flight), and the sync commits."""
    import types
    moved, begins = [], []
    monkeypatch.setattr(rig.peer, "target", types.SimpleNamespace(links=("one", "two")), raising=False)
    rig.peer.link = "one"

    def reattach(group, sync_id, why, settled=False):
        moved.append((group, sync_id, settled))
        rig.peer.link = "two"
        return "two"
    monkeypatch.setattr(rig.peer, "reattach", reattach, raising=False)
    real_begin_start, real_commit = rig.peer.begin_start, rig.peer.commit

    def begin_start(*args):
        begins.append(args)
        answer = real_begin_start(*args)
        if len(begins) == 1:
            def lost():
                answer()                             # the backup did begin...
                raise LinkError("the connection to the agent closed")   # ...and the answer was lost
            return lost
        return answer

    commits = []

    def commit(group, generation, sync_id):
        res = real_commit(group, generation, sync_id)
        commits.append(sync_id)
        if len(commits) == 1:
            raise LinkError("no answer from the agent within 25 s")     # committed, answer lost
        return res
    monkeypatch.setattr(rig.peer, "begin_start", begin_start)
    monkeypatch.setattr(rig.peer, "commit", commit)
    rig.sync(Event.START)
    g = rig.a.group("g")
    # settled both times: a begin may never have reached the agent, a commit may have been made there
    assert moved == [("g", g.sync_id, True), ("g", g.sync_id, True)] and len(commits) == 2
    assert len(begins) == 2 and begins[1] == (*begins[0][:6], "two")     # bound to the link now in use
    rig.assert_consistent()


def test_read_error_marks_the_volume_stale_rolls_back_and_waits_for_the_admin(rig):
    """Issue 11 #6: a read error during a delta rolls the group back, marks that volume stale (3PAR) and
    stops the group with a device fault (auto_recover does not retry it); the next sync sends that
    volume whole and clears the mark. During a full sync the volume ends not-synced."""
    rig.sync(Event.START)
    before = {s: bytes(d) for s, d in rig.bdisks.items()}
    rig.write("/p/a", 0, os.urandom(4096))
    rig.write("/p/b", 0, os.urandom(4096))
    rig.sender.read_error_on = "/b/b"
    with pytest.raises(SyncFailed, match="b marked stale"):
        rig.sync()
    assert {s: bytes(d) for s, d in rig.bdisks.items()} == before
    g = rig.a.group("g")
    assert (g.state, g.fault) == (GroupState.STOPPED, "device") and "read error" in g.reason
    assert {v.name: v.state for v in rig.a.volumes("g")} == {"a": VolumeState.SYNCED, "b": VolumeState.STALE}
    rig.sender.read_error_on = None
    rep = rig.sync()
    assert rep.volumes["a"][1] == "" and "was stale" in rep.volumes["b"][1]
    assert [v.state for v in rig.a.volumes("g")] == [VolumeState.SYNCED] * 2
    rig.assert_consistent()
    rig.sender.read_error_on = "/b/a"
    with pytest.raises(SyncFailed, match="a marked not-synced"):
        rig.sync(full="full sync requested by the administrator")
    assert {v.name: v.state for v in rig.a.volumes("g")}["a"] is VolumeState.NOT_SYNCED


def test_a_failed_rollback_marks_that_secondary_and_blocks_nothing(rig, monkeypatch):
    """Issue 11 #4: a rollback that fails (an invalid R(n) LVM refuses to merge) does not stop the agent:
    the other secondaries roll back, that one is marked failed with the reason, and its next sync is full."""
    from rcopy.errors import DeviceError
    rig.sync(Event.START)
    before = bytes(rig.bdisks["/b/a"])
    rig.write("/p/a", 0, os.urandom(4096))
    rig.write("/p/b", 0, os.urandom(4096))
    real = rig.bsnap.rollback

    def rollback(snap):
        if snap.origin == "/b/b":
            raise DeviceError("Unable to merge invalidated snapshot")
        return real(snap)
    monkeypatch.setattr(rig.bsnap, "rollback", rollback)
    rig.sender.fail_on = "/b/b"
    with pytest.raises(SyncFailed, match="link lost"):
        rig.sync()
    assert bytes(rig.bdisks["/b/a"]) == before                       # the other secondary rolled back
    vb = {v.name: v for v in rig.b.volumes("g")}
    assert vb["b"].state is VolumeState.FAILED and vb["a"].state is VolumeState.SYNCED
    assert "could not be rolled back" in rig.b.group("g").reason
    monkeypatch.setattr(rig.bsnap, "rollback", real)
    rig.sender.fail_on = None
    rig.bsnap.snaps.clear()                                           # the broken R(1) went with its merge
    rep = rig.sync()                                                  # the agent still serves
    assert rep.volumes["a"][1] == "" and "does not hold sync point 1" in rep.volumes["b"][1]
    rig.assert_consistent()


def test_an_export_that_refuses_our_certificate_stops_the_group_as_auth_not_link(rig, monkeypatch):
    """Issue 13: the backup's export refusing this sync's client certificate rolls the sync back and stops
    the group with fault "auth" (auto_recover does not restart it) and exit code 20, with the reason."""
    from rcopy.transport.nbd_errors import NbdClientRefused
    rig.sync(Event.START)

    def refused(source, extents, export, progress=None):
        raise NbdClientRefused("Connection reset by peer", where="169.254.77.2:10809")

    monkeypatch.setattr(rig.sender, "send", refused)
    rig.write("/p/a", 0, os.urandom(4096))
    with pytest.raises(SyncFailed) as ei:
        rig.sync()
    assert ei.value.exit_code == 20 and "did not admit this sync's client certificate" in str(ei.value)
    g = rig.a.group("g")
    assert (g.state, g.fault) == (GroupState.STOPPED, "auth") and "clocks" in g.reason


def test_the_quiet_check_asks_the_answers_that_cost_no_command_first_and_stops_at_a_written_volume(rig):
    rig.sync(Event.START)
    asked = []

    class Source:
        def __init__(self, cost, quiet):
            self.check_commands, self.quiet = cost, quiet

        def unchanged_since(self, base, origin):
            asked.append(origin)
            return self.quiet

    real = rig.driver.backend("fake")
    kinds = {"thinlike": Source(1, True), "thicklike": Source(0, False)}
    backends = {k: types.SimpleNamespace(changes=c, snapshotter=real.snapshotter) for k, c in kinds.items()}
    rig.driver.backend = lambda kind: backends.get(kind, real)
    a, b = rig.a.volumes("g")
    vols = [dataclasses.replace(a, backend="thinlike"), dataclasses.replace(b, backend="thicklike")]
    assert rig.driver.unchanged(rig.a.group("g"), vols) is False
    assert asked == [b.local]                     # the free answer said "written": no thin_delta ran


# -- the backup's tidy-up after its commit: answered first, durable, finished by whoever comes next ------

def test_the_backup_answers_its_commit_before_its_tidy_up(rig, monkeypatch):
    rig.sync(Event.START)
    rig.write("/p/a", 0, os.urandom(4096))
    seen = []
    tidy_up = rig.agent.tidy_up

    def look():                          # what the backup holds once its commit's answer is on its way
        if rig.agent.tidying:
            seen.append((rig.b.group("g").generation, rig.b.group("g").tidy, sorted(n for _, n in rig.bsnap.snaps)))
        tidy_up()
    monkeypatch.setattr(rig.agent, "tidy_up", look)
    rig.sync()
    assert seen == [(2, 2, ["rcopy.g.a.R1", "rcopy.g.b.R1"])]     # committed, R1 kept, the tidy-up recorded
    assert rig.b.group("g").tidy == 0
    assert [e[1] for e in rig.log if e[0] == "peer"][-2:] == ["commit", "tidy"]
    rig.assert_consistent()


def test_an_agent_dead_after_answering_its_commit_leaves_its_tidy_up_to_the_next_start(rig, monkeypatch):
    rig.sync(Event.START)
    rig.write("/p/a", 0, os.urandom(4096))
    _crash_at(monkeypatch, "agent-before-tidy")
    rep = rig.sync()                     # committed on both sides: the lost tidy-up is only a warning
    monkeypatch.setattr(faults, "point", lambda p, code=99: None)
    assert rep.generation == 2 and rig.a.group("g").generation == rig.b.group("g").generation == 2
    assert rig.b.group("g").tidy == 2 and ("/b/a", "rcopy.g.a.R1") in rig.bsnap.snaps
    rig.connect()                        # the next agent's start finishes it
    assert rig.b.group("g").tidy == 0
    rig.assert_consistent()
    rig.write("/p/b", 4096, os.urandom(4096))
    rep = rig.sync()
    assert rep.volumes == {"a": (0, ""), "b": (4096, "")}        # deltas: the backup still holds point 2
    rig.assert_consistent()


def test_an_agent_start_with_nothing_to_tidy_looks_for_no_snapshot(rig):
    rig.sync(Event.START)
    rig.write("/p/a", 0, os.urandom(4096))
    rig.sync()
    asked = []
    agent = make_agent(rig.b, rig.bsnap, None)
    agent.delete = lambda requests: asked.append(tuple(requests)) or 0
    agent.recover()
    assert asked == []
    with rig.b.tx() as db:               # as an agent dead inside its tidy-up leaves it
        db.execute("UPDATE groups SET tidy=2 WHERE name='g'")
    agent.recover()
    assert asked == [(("fake", "/b/a", "rcopy.g.a.R1"), ("fake", "/b/b", "rcopy.g.b.R1"))]
    assert rig.b.group("g").tidy == 0


def test_a_begin_waits_for_another_agents_tidy_up_instead_of_refusing(rig):
    import threading
    rig.sync(Event.START)
    first = rig.agent                    # answers a commit and has not tidied up yet ...
    ok = first.handle({"id": 1, "op": "begin", "args": dict(
        group="g", generation=2, sync_id="two", base_generation=1, base_id=rig.b.group("g").sync_id,
        remotes=list(VOLS.values()), bind="127.0.0.1")})
    assert ok["ok"], ok
    assert first.handle({"id": 2, "op": "commit", "args": dict(group="g", generation=2, sync_id="two")})["ok"]
    assert first.tidying
    second = make_agent(rig.b, rig.bsnap, lambda vols, bind, cert="", granule=0, **links: FakeExport(vols, bind, rig.bdisks))
    answers = []
    t = threading.Thread(target=lambda: answers.append(second.handle({"id": 1, "op": "begin", "args": dict(
        group="g", generation=3, sync_id="three", base_generation=2, base_id="two",
        remotes=list(VOLS.values()), bind="127.0.0.1")})))
    t.start()                            # ... when a new session's begin comes: it waits for the lock
    t.join(0.5)
    assert t.is_alive() and not answers
    first.tidy_up()
    t.join(30)
    assert answers and answers[0]["ok"], answers
    assert ("/b/a", "rcopy.g.a.R1") not in rig.bsnap.snaps and ("/b/a", "rcopy.g.a.R2") in rig.bsnap.snaps


def test_the_backups_daemon_finishes_a_dead_agents_tidy_up(rig, monkeypatch):
    from rcopy.app.service import Service
    rig.sync(Event.START)
    rig.write("/p/a", 0, os.urandom(4096))
    _crash_at(monkeypatch, "agent-before-tidy")
    rig.sync()
    monkeypatch.setattr(faults, "point", lambda p, code=99: None)
    assert rig.b.group("g").tidy == 2                # and no agent starts: the primary is gone for a while
    svc = Service(rig.b, lambda g: None, abandoned=make_agent(rig.b, rig.bsnap, None).rollback_abandoned,
                  probe=lambda link: False, clock=lambda: 1000.0)
    svc.tick()
    assert rig.b.group("g").tidy == 0 and not rig.bsnap.snaps


class PreparingSender(FakeSender):
    """A sender that can open its connections ahead (NbdSender.prepare) and logs when it does."""

    def prepare(self, exports):
        self.log.append(("prepare", sorted(e.name for e in exports)))

    def release(self):
        self.log.append(("release",))


def test_the_sync_prepares_every_export_before_the_sends_and_releases_after_them_whatever_the_outcome(rig):
    rig.sender = PreparingSender(rig.psnap, rig.bdisks, rig.log)
    rig.connect()
    rig.sync(Event.START)
    for fail in (None, "/b/b"):
        rig.write("/p/a", 0, os.urandom(4096))
        rig.write("/p/b", 0, os.urandom(4096))
        rig.log.clear()
        rig.sender.fail_on = fail
        if fail:
            with pytest.raises(SyncFailed):
                rig.sync()
        else:
            rig.sync()
        steps = [e[0] for e in rig.log if e[0] in ("prepare", "send", "release")]
        assert rig.log[[e[0] for e in rig.log].index("prepare")][1] == sorted(VOLS.values())
        assert steps[0] == "prepare" and steps.count("prepare") == 1
        assert steps[-1] == "release" and steps.count("release") == 1       # after every send, once
    rig.sender.fail_on = None
    rig.sync()
    rig.log.clear()
    rig.sync()                           # nothing written since: confirmed, no export, nothing prepared
    assert not [e for e in rig.log if e[0] in ("prepare", "release")]
