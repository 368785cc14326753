"""What an admin's monitoring sees (issue 14, observability): lag, the last sync's duration and bytes in
``rcopy status --json`` and ``rcopy metrics`` (Prometheus text, parsed by prometheus_client), the daemon's
textfile, alerts raised, listed and cleared, and progress that counts only what the backup acknowledged.
The CLI runs for real against the file simulator and nbdkit on 127.0.0.1 (tests/unit/test_cli_replication.py)."""
import json
import os
import sqlite3
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rcopy.app import alerts
from rcopy.engine.states import Event
from rcopy.extent import Extent
from rcopy.ports import ExportInfo
from rcopy.state import Store
from rcopy.transport.sender import NbdSender

from tests.unit.engine_fakes import FakeSender
from tests.unit.nbd_servers import serve  # noqa: F401  (fixture)
from tests.unit.test_cli_replication import MiB, needs_nbdkit_mark, two_systems


@pytest.fixture
def sys2(tmp_path):
    s = two_systems(tmp_path)
    s.rcopy("group", "start", "g", "--wait")
    return s


def sql(s, statement, *args, state=None):
    with sqlite3.connect(os.path.join(state or s.A, "rcopy.db")) as c:
        return c.execute(statement, args).fetchall()


def group(s, state=None):
    return s.status(state)["groups"][0]


def metrics(text):
    """{metric name: [(labels, value)]} from Prometheus text exposition, parsed by prometheus_client."""
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.type == "gauge" and fam.documentation, fam.name
        for smp in fam.samples:
            out.setdefault(smp.name, []).append((smp.labels, smp.value))
    return out


def one(m, name, **labels):
    got = [v for lab, v in m.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(got) == 1, (name, labels, m.get(name))
    return got[0]


@needs_nbdkit_mark
def test_status_json_has_lag_duration_and_bytes_and_lag_grows_between_syncs(sys2):
    s = sys2
    for i, p in enumerate(s.vols):
        s.write_random(p, 20, seed=i)
    s.rcopy("sync", "g", "--wait")
    g = group(s)
    vols = g["volumes"]
    assert g["sync_point"]["generation"] == 2
    assert g["last_sync_start"] <= g["sync_point"]["cut"] <= g["last_sync_end"]      # the cut is mid-sync
    assert g["lag_seconds"] is not None and g["lag_seconds"] >= 0
    assert g["last_sync_seconds"] == g["last_sync"]["seconds"] > 0
    assert g["last_sync_bytes_sent"] == sum(v["bytes_sent"] for v in vols) > 0
    assert g["last_sync_bytes_changed"] == sum(v["bytes_changed"] for v in vols)
    assert all(0 < v["bytes_sent"] <= v["bytes_changed"] <= 20 * 4096 for v in vols)   # 4 KiB blocks, some may coincide
    # no sync since: the lag is measured from the stored cut, so it grows with the clock alone
    cut = time.time() - 3600
    sql(s, "UPDATE sync_points SET cut=? WHERE grp='g' AND committed=1", cut)
    t0 = time.time()
    lag1 = group(s)["lag_seconds"]
    t1 = time.time()
    assert t0 - cut - 0.001 <= lag1 <= t1 - cut + 0.001
    lag2 = group(s)["lag_seconds"]
    assert lag2 >= lag1
    assert "lag 1h00m" in s.rcopy("status").stdout
    # the backup shows lag too (from its own record of the point), and a new sync brings the lag down
    assert group(s, s.B)["lag_seconds"] is not None
    s.rcopy("sync", "g", "--wait")
    assert group(s)["lag_seconds"] < lag2


@needs_nbdkit_mark
def test_metrics_are_prometheus_text_with_lag_bytes_and_duration_per_group(sys2):
    s = sys2
    s.write_random(next(iter(s.vols)), 10, seed=7)
    s.rcopy("sync", "g", "--wait")
    g = group(s)
    m = metrics(s.rcopy("metrics").stdout)
    lab = {"group": "g", "target": "backup"}
    assert one(m, "rcopy_group_lag_seconds", **lab) >= 0
    assert one(m, "rcopy_group_last_sync_duration_seconds", **lab) == g["last_sync_seconds"]
    assert one(m, "rcopy_group_last_sync_sent_bytes", **lab) == g["last_sync_bytes_sent"] > 0
    assert one(m, "rcopy_group_last_sync_changed_bytes", **lab) == g["last_sync_bytes_changed"] > 0
    assert one(m, "rcopy_group_sync_point", **lab) == 2
    assert one(m, "rcopy_group_up", **lab) == 1
    assert one(m, "rcopy_group_info", **lab, state="started", role="primary") == 1
    assert one(m, "rcopy_group_last_sync_commands", **lab, side="local") == g["last_sync"]["commands"]
    assert one(m, "rcopy_group_last_sync_commands", **lab, side="peer") == g["last_sync"]["peer_commands"]
    for v in g["volumes"]:
        assert one(m, "rcopy_volume_last_sync_sent_bytes", **lab, volume=v["name"]) == v["bytes_sent"]
        assert one(m, "rcopy_volume_last_sync_changed_bytes", **lab, volume=v["name"]) == v["bytes_changed"]
        assert one(m, "rcopy_volume_state", **lab, volume=v["name"], state="synced") == 1
    assert one(m, "rcopy_link_up", target="backup", address="127.0.0.1") == 1
    assert one(m, "rcopy_alerts", kind="over_period") == 0
    # the backup's side exports the same families for its secondary group
    mb = metrics(s.rcopy("metrics", state=s.B).stdout)
    assert one(mb, "rcopy_group_info", group="g", role="secondary") == 1


@needs_nbdkit_mark
def test_daemon_writes_the_metrics_textfile_atomically(sys2):
    s = sys2
    out = s.tmp / "textfile"
    out.mkdir()
    path = out / "rcopy.prom"
    s.rcopy("daemon", "--once", "--metrics-file", str(path))       # nothing due (period 5 m): no sync
    m = metrics(path.read_text())
    assert one(m, "rcopy_group_sync_point", group="g", target="backup") == 1
    assert one(m, "rcopy_group_lag_seconds", group="g", target="backup") >= 0
    assert os.listdir(out) == ["rcopy.prom"]                          # the temporary file was renamed
    assert oct(path.stat().st_mode & 0o777) == "0o644"                # node_exporter runs as another user
    s.rcopy("daemon", "--once", env={"RCOPY_METRICS_FILE": str(path)})    # the same from the environment
    assert os.listdir(out) == ["rcopy.prom"] and "rcopy_group_lag_seconds" in path.read_text()


@needs_nbdkit_mark
def test_over_period_alert_is_raised_listed_and_cleared(sys2):
    s = sys2
    assert "over_per_alert" in group(s)["policies"]                   # on by default, as on 3PAR
    # a period no sync can keep (the CLI accepts 15 s at least; the store takes any number)
    sql(s, "UPDATE groups SET period=0.001 WHERE name='g'")
    r = s.rcopy("sync", "g", "--wait")
    assert r.stderr == ""                                             # alerts go to syslog, not to stderr
    listed = json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"]
    assert [(a["kind"], a["object"], a["group"]) for a in listed] == [("over_period", "g", "g")]
    assert "longer than the period" in listed[0]["message"] and listed[0]["since"] > 0
    human = s.rcopy("status", "alerts").stdout
    assert "over_period" in human and "longer than the period" in human
    g = group(s)
    assert g["alerts"] == listed and "longer than the period" in g["alert"]
    assert "ALERT over_period" in s.rcopy("status").stdout
    assert one(metrics(s.rcopy("metrics").stdout), "rcopy_alerts", kind="over_period") == 1
    s.rcopy("sync", "g", "--wait")                                    # still over: the same alert, not a new one
    again = json.loads(s.rcopy("status", "alerts", "g", "--json").stdout)["alerts"]
    assert [a["since"] for a in again] == [listed[0]["since"]]
    sql(s, "UPDATE groups SET period=300 WHERE name='g'")
    s.rcopy("sync", "g", "--wait")                                    # within the period: cleared
    assert json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"] == []
    assert group(s)["alert"] == "" and "no alerts" in s.rcopy("status", "alerts").stdout


@needs_nbdkit_mark
def test_link_down_and_target_failed_alerts_follow_the_link(sys2):
    s = sys2
    agent = sql(s, "SELECT agent FROM targets WHERE name='backup'")[0][0]
    sql(s, "UPDATE targets SET agent='/nonexistent/agent' WHERE name='backup'")    # the target stops answering
    r = s.rcopy("sync", "g", "--wait", check=False)
    assert r.returncode == 10 and r.stderr.count("\n") == 1          # errors stay one line
    kinds = {(a["kind"], a["object"]) for a in json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"]}
    assert kinds == {("link_down", "backup/127.0.0.1")}               # failed only after its target timeout
    sql(s, "UPDATE links SET since=since-200 WHERE target='backup'")  # ... which has now passed
    assert s.rcopy("sync", "g", "--wait", check=False).returncode == 10
    kinds = {(a["kind"], a["object"]) for a in json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"]}
    assert kinds == {("link_down", "backup/127.0.0.1"), ("target_failed", "backup")}
    assert len(json.loads(s.rcopy("status", "alerts", "backup", "--json").stdout)["alerts"]) == 2
    g = group(s)                                                      # and the group says why it stopped
    assert g["state"] == "stopped" and g["reason"].startswith("target failed: backup unreachable on every link"), g
    sql(s, "UPDATE targets SET agent=? WHERE name='backup'", agent)                  # back
    s.rcopy("sync", "g", "--wait")
    assert json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"] == []


def test_alerts_go_to_syslog_once_with_their_priority(tmp_path, monkeypatch):
    import syslog
    seen = []
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: seen.append((prio, text)))
    store = Store(str(tmp_path / "A"))
    assert alerts.raise_(store, "over_period", "g", "too slow", "g")
    assert not alerts.raise_(store, "over_period", "g", "too slow again", "g")   # standing: not logged twice
    assert alerts.raise_(store, "target_failed", "t", "unreachable")
    assert [a.message for a in store.alerts("g")] == ["too slow again"]
    assert alerts.clear(store, "over_period", "g", "fine now") is not None
    assert alerts.clear(store, "over_period", "g") is None
    assert [p for p, _ in seen] == [syslog.LOG_WARNING, syslog.LOG_ERR, syslog.LOG_NOTICE]
    assert "ALERT over_period g: too slow" in seen[0][1] and "cleared" in seen[2][1]


def test_stale_and_link_alerts_follow_the_recorded_states(tmp_path, monkeypatch):
    import dataclasses
    import syslog
    from rcopy.model import Group, LinkState, Target, VolumePair, VolumeState
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: None)
    store = Store(str(tmp_path / "A"))
    store.add_target(Target("t", ("l1", "l2")))
    store.add_group(Group("g", "t"))
    store.add_volume(VolumePair("g", "v", "/p/v", "/s/v", 4096, state=VolumeState.SYNCED))
    store.put_volume(dataclasses.replace(store.volumes("g")[0], state=VolumeState.STALE))
    store.set_link_state("t", "l1", LinkState.DOWN, now=900.0)
    alerts.refresh(store, now=901.0)
    assert {(a.kind, a.object) for a in store.alerts()} == {("stale", "g/v"), ("link_down", "t/l1")}
    assert [a.kind for a in store.alerts("g")] == ["stale"]
    store.set_link_state("t", "l2", LinkState.DOWN, now=1000.0)      # every link down ...
    alerts.refresh(store, now=1199.0)
    assert {a.kind for a in store.alerts()} == {"stale", "link_down"}
    alerts.refresh(store, now=1200.0)                                # ... for the target timeout: failed
    assert {a.kind for a in store.alerts()} == {"stale", "link_down", "target_failed"}
    store.set_link_state("t", "l1", LinkState.UP)                    # one link back: target answers again
    store.put_volume(dataclasses.replace(store.volumes("g")[0], state=VolumeState.SYNCED))
    alerts.refresh(store)
    assert [(a.kind, a.object) for a in store.alerts()] == [("link_down", "t/l2")]


def test_a_link_state_records_since_when_it_holds(tmp_path):
    """``rcopy status links`` says since when a link is up or down: the time moves on a change only."""
    from rcopy.model import LinkState, Target
    store = Store(str(tmp_path / "A"))
    store.add_target(Target("t", ("l1", "l2")))
    assert [(l.state, l.since) for l in store.links("t")] == [(LinkState.UNKNOWN, 0.0)] * 2
    store.set_link_state("t", "l1", LinkState.UP, now=100.0)
    store.set_link_state("t", "l1", LinkState.UP, now=160.0)          # still up: since stays
    assert store.links("t")[0].since == 100.0
    store.set_link_state("t", "l1", LinkState.DOWN, now=200.0)
    assert (store.links("t")[0].state, store.links("t")[0].since) == (LinkState.DOWN, 200.0)
    store.close()


@needs_nbdkit_mark
def test_status_shows_since_when_each_link_is_in_its_state(sys2):
    s = sys2
    [link] = json.loads(s.rcopy("status", "links", "--json").stdout)["targets"][0]["links"]
    assert link["state"] == "up" and 0 < time.time() - link["since"] < 3600, link
    text = s.rcopy("status", "links").stdout
    assert f"127.0.0.1 up since {time.strftime('%Y-%m-%d', time.localtime(link['since']))}" in text, text


def test_a_sync_still_running_past_its_period_raises_over_period(tmp_path, monkeypatch):
    import syslog
    from rcopy.model import Group, GroupState
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: None)
    store = Store(str(tmp_path / "A"))
    store.add_group(Group("g", "t", period=60, state=GroupState.STARTED, generation=3))
    g = store.begin_sync("g", 4, "id4", [])
    alerts.refresh(store, now=g.last_sync_start + 60)                 # exactly one period: not over
    assert store.alerts() == []
    alerts.refresh(store, now=g.last_sync_start + 61)
    assert [(a.kind, a.object) for a in store.alerts()] == [("over_period", "g")]
    assert "sync point 4 has run 61 s" in store.alerts()[0].message


def test_state_v3_alert_text_moves_into_the_alerts_table(tmp_path):
    d = tmp_path / "A"
    Store(str(d)).close()
    db = str(d / "rcopy.db")
    with sqlite3.connect(db) as c:                                   # make it a version 3 database with an alert
        c.execute("DROP TABLE alerts")
        c.execute("ALTER TABLE sync_points DROP COLUMN cut")
        c.execute("ALTER TABLE links DROP COLUMN since")
        c.execute("ALTER TABLE targets DROP COLUMN link_timeout")
        c.execute("ALTER TABLE targets DROP COLUMN target_timeout")
        c.execute("ALTER TABLE targets DROP COLUMN ssh_persist")
        c.execute("ALTER TABLE groups DROP COLUMN tidy")
        c.execute("INSERT INTO groups (name, target, role, mode, state, alert, last_sync_end) VALUES "
                  "('g', 't', 'primary', 'periodic', 'started', 'thin pool vg/pool is 95% full', 100)")
        c.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    store = Store(str(d))
    assert [(a.kind, a.object, a.message, a.since) for a in store.alerts()] == \
        [("space", "g", "thin pool vg/pool is 95% full", 100)]
    assert store.group("g").alert == ""


# -- progress: what the backup acknowledged, never what was read --------------------------------------

class _Recorder:
    def __init__(self):
        self.updates = []

    def start(self, volume, total):
        pass

    def update(self, volume, done, total):
        self.updates.append((volume, done, total))

    def finish(self, volume, sent, reason):
        pass


class ReadAheadSender(FakeSender):
    """Reads every extent first (as the real sender's reader runs ahead of the wire), then lands and
    acknowledges them one by one, reporting acknowledged bytes as the real NbdSender does."""

    def send(self, source_path, extents, export, progress=None):
        data, dest = self.primary.data(source_path), self.backup[export.name]
        read = list(extents)                          # the whole volume read before any reply
        self.acked[export.name] = 0
        for e in read:
            dest[e.offset:e.end] = bytes(e.length) if e.zero else data[e.offset:e.end]
            self.acked[export.name] += e.length
            progress(self.acked[export.name])
        return sum(e.length for e in read if not e.zero)


def test_driver_reports_acknowledged_bytes_not_the_read_position(tmp_path):
    from tests.unit.test_engine_cycle import SIZE, Rig
    rig = Rig(tmp_path)
    rig.sender = ReadAheadSender(rig.psnap, rig.bdisks, rig.log)
    rig.sender.acked = {}
    rec = _Recorder()
    rig.connect()
    rig.driver.sender, rig.driver.progress = rig.sender, rec
    rig.sync(Event.START)                             # full: every block of both volumes
    assert rec.updates
    acked_seen = {}
    for volume, done, total in rec.updates:
        assert done <= total <= SIZE
        assert done >= acked_seen.get(volume, 0)      # never goes back
        acked_seen[volume] = done
    # the read position was the volume's end from the first update on; progress started low
    firsts = {}
    for volume, done, _ in rec.updates:
        firsts.setdefault(volume, done)
    assert all(done < SIZE for done in firsts.values())
    assert {v: d for v, d in acked_seen.items()} == {"a": SIZE, "b": SIZE}


@needs_nbdkit_mark
def test_sender_progress_never_exceeds_what_landed_on_a_slow_server(serve, tmp_path):  # noqa: F811
    """nbdkit's file plugin under the delay filter (and noparallel: one request at a time) writes each
    request into the file before it replies: at every progress report, the reported bytes must already
    be in the server's file."""
    size, chunk = 4 * MiB, 256 * 1024
    s = serve("nbdkit-file", size=size, filters=("noparallel", "delay"), params=("delay-write=100ms",))
    src = tmp_path / "src"
    data = os.urandom(size)
    src.write_bytes(data)
    reports = []

    def landed() -> int:
        with open(s.path, "rb") as f:
            have = f.read()
        return sum(4096 for o in range(0, size, 4096) if have[o:o + 4096] == data[o:o + 4096])

    def progress(done):
        reports.append((done, landed()))

    extents = [Extent(o, chunk) for o in range(0, size, chunk)]
    sent = NbdSender(max_request=chunk).send(str(src), extents, ExportInfo(s.host, s.port, "", size), progress)
    assert sent == size and landed() == size
    assert all(done <= on_disk for done, on_disk in reports), reports
    assert any(0 < done < size for done, _ in reports), reports       # reports came while it was sending
    assert reports[-1][0] == size


def test_a_detached_sync_that_fails_says_why_in_syslog(tmp_path, monkeypatch):
    """Nobody reads a detached sync's output (``rcopy sync`` without --wait): its failure goes to syslog
    at LOG_ERR, one line naming the group; a detached sync that succeeds logs nothing there."""
    import syslog
    from rcopy.app import session
    from rcopy.errors import SyncFailed
    seen = tmp_path / "syslog"
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: seen.open("a").write(f"{prio} {text}\n"))
    store = Store(str(tmp_path / "A"))

    def fails():
        raise SyncFailed("group g: the backup said no")
    for fn, code in ((fails, 1), (lambda: None, 0)):
        pid = session.background(store, "g", fn)
        assert os.waitpid(pid, 0)[1] >> 8 == code
        store = Store(str(tmp_path / "A"))        # background closed it before forking
    assert seen.read_text() == f"{syslog.LOG_ERR} detached sync of group g failed: group g: the backup said no\n"


@pytest.mark.parametrize("error, fault, reason", [
    ("LinkError", "link", "the sync did not begin: it went wrong"),
    ("TargetUnreachable", "link", "target t unreachable: it went wrong"),
    ("AuthFailed", "auth", "it went wrong"), ("Busy", None, ""), ("StateError", None, "")])
def test_what_stops_a_sync_before_it_begins_stops_the_group_only_for_a_link_or_an_identity(tmp_path, error, fault,
                                                                                        reason):
    """session.stop_for: a link fault stops a running group as "link" (auto_recover retries it), a
    refused identity as "auth"; anything else (a stale agent on the backup still letting go: Busy)
    leaves the group started for the next run to ask again."""
    import dataclasses
    from rcopy import errors
    from rcopy.app import session
    from rcopy.model import Group, GroupState, Target
    from rcopy.transport import peer
    store = Store(str(tmp_path / "A"))
    store.add_target(Target("t", ("l1",)))
    store.add_group(Group("g", "t"))
    store.put_group(dataclasses.replace(store.group("g"), state=GroupState.STARTED, generation=3))
    session.stop_for(store, "g", (getattr(errors, error, None) or getattr(peer, error))("it went wrong"))
    g = store.group("g")
    if fault is None:
        assert (g.state, g.fault, g.reason) == (GroupState.STARTED, "", "")
    else:
        assert (g.state, g.fault, g.reason) == (GroupState.STOPPED, fault, reason)
