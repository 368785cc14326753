"""The daemon's device watch (issue 14): a sending group whose volume's device is gone, resized or made
read-only stops with the reason and a ``device`` alert; a backup's read-only secondaries are not faults;
a group syncing right now is left to fail by itself; the alert clears when the device is back. The last
test runs the CLI's daemon against the file simulator (a volume file deleted, then resized)."""
import json
import os

import pytest

from rcopy.app import devices
from rcopy.app.service import Service
from rcopy.model import Group, GroupState, Role, Target, VolumePair
from rcopy.state import Store
from rcopy.sys.nodes import Presence, presence

from tests.unit.test_cli_replication import SIZE as SIZE_FILE, needs_nbdkit_mark, snap, two_systems

SIZE = 4 << 20


def alerts(s):
    return json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"]


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "A"))
    s.add_target(Target("t", ("192.0.2.1",)))
    for name, role in (("g", Role.PRIMARY), ("sec", Role.SECONDARY)):
        s.add_group(Group(name, "t", role=role, period=60, state=GroupState.STARTED, generation=1))
        s.add_volume(VolumePair(name, "v", f"/dev/{name}/v", "/dev/x/v", SIZE, backend="thin"))
    s.add_group(Group("new", "t"))
    s.add_volume(VolumePair("new", "v", "/dev/new/v", "/dev/x/v", SIZE, backend="thin"))
    yield s
    s.close()


def test_each_fault_is_named_with_the_device_and_what_changed():
    v = VolumePair("g", "data", "/dev/vg/data", "/dev/vg/data", SIZE)
    assert devices.fault(v, Presence(True, SIZE)) == ""
    assert devices.fault(v, Presence(False)) == "device /dev/vg/data of volume data is gone (removed or deactivated)"
    assert devices.fault(v, Presence(True, 2 * SIZE)) == \
        f"device /dev/vg/data of volume data is now {2 * SIZE} bytes, admitted at {SIZE}"
    assert devices.fault(v, Presence(True, SIZE, read_only=True)) == \
        "device /dev/vg/data of volume data became read-only"


def test_a_gone_device_stops_its_sending_group_once_and_the_alert_clears_when_it_is_back(store):
    seen = {"/dev/g/v": Presence(False), "/dev/sec/v": Presence(True, SIZE, read_only=True),
            "/dev/new/v": Presence(False)}
    stopped = devices.check(store, lambda p: seen[p])
    assert [g for g, _ in stopped] == ["g"]                   # not the backup's (read-only by design), not a new one
    g = store.group("g")
    assert g.state is GroupState.STOPPED and g.fault == "device"
    assert g.reason == ("device /dev/g/v of volume v is gone (removed or deactivated): bring it back as admitted, "
                        "then 'rcopy group start g'")
    assert [(a.kind, a.object) for a in store.alerts()] == [("device", "g/v")]
    assert store.group("sec").state is GroupState.STARTED and store.group("new").state is GroupState.NEW
    assert devices.check(store, lambda p: seen[p]) == []      # already stopped for it: nothing again
    seen["/dev/g/v"] = Presence(True, SIZE)
    assert devices.check(store, lambda p: seen[p]) == [] and store.alerts() == []
    assert store.group("g").state is GroupState.STOPPED      # the administrator starts it again


def test_a_group_syncing_now_is_left_to_its_sync_and_stopped_by_the_next_look(store):
    fd = store.try_lock("g")                                   # another process's sync holds the group
    try:
        assert devices.check(store, lambda p: Presence(True, SIZE // 2)) == []
        assert store.group("g").state is GroupState.STARTED
        assert [a.kind for a in store.alerts()] == ["device"]  # the alert is raised at once all the same
    finally:
        os.close(fd)
    [(group, reason)] = devices.check(store, lambda p: Presence(True, SIZE // 2))
    assert group == "g" and f"is now {SIZE // 2} bytes" in reason


def test_the_daemon_loop_stops_the_group_before_its_due_sync_starts(store):
    syncs = []
    svc = Service(store, syncs.append, clock=lambda: 10 ** 9,
                  devices=lambda: devices.check(store, lambda p: Presence(p != "/dev/g/v", SIZE)))
    assert svc.watch_devices() == [("g", store.group("g").reason)]
    assert svc.tick() == [] and syncs == []


def test_presence_reads_files_and_missing_paths(tmp_path):
    f = tmp_path / "vol"
    f.write_bytes(b"\0" * 8192)
    assert presence(str(f)) == Presence(True, 8192)
    assert presence(str(tmp_path / "nothing")) == Presence(False)
    assert presence(str(tmp_path)) == Presence(False)         # neither a block device nor a volume file


@needs_nbdkit_mark
def test_the_daemon_stops_a_group_whose_volume_is_deleted_then_resized(tmp_path):
    s = two_systems(tmp_path)
    s.rcopy("group", "start", "g", "--wait")
    victim = sorted(s.vols)[0]
    os.rename(victim, victim + ".away")
    s.rcopy("daemon", "--once")
    g = s.status()["groups"][0]
    assert g["state"] == "stopped" and "is gone (removed or deactivated)" in g["reason"] and victim in g["reason"]
    assert [a["kind"] for a in alerts(s)] == ["device"]
    os.rename(victim + ".away", victim)
    os.truncate(victim, os.path.getsize(victim) * 2)
    s.rcopy("daemon", "--once")
    assert "bytes, admitted at" in alerts(s)[0]["message"]
    before = s.status(s.B)["groups"][0]["sync_point"]
    r = s.rcopy("group", "start", "g", "--wait", check=False)     # refused before anything is cut
    assert r.returncode == 13 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip().endswith(f"group g stopped: device {victim} of volume v1-img is now "
                                     f"{os.path.getsize(victim)} bytes, admitted at {SIZE_FILE}: bring it back as "
                                     "admitted, then 'rcopy group start g'"), r.stderr
    r = s.rcopy("sync", "g", check=False)                     # a background request is refused at once too
    assert r.returncode == 13 and "bring it back as admitted" in r.stderr, r.stderr
    assert not os.path.exists(snap(victim, 2)) and s.status(s.B)["groups"][0]["sync_point"] == before
    os.truncate(victim, SIZE_FILE)                             # back as admitted: the admin starts it again
    s.rcopy("group", "start", "g", "--wait")
    assert s.status()["groups"][0]["state"] == "started" and alerts(s) == []
    s.rcopy("verify", "g")
