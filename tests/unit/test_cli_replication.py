"""The CLI end to end on the host with the file simulator: two systems (state dirs A and B) on one host,
the agent run locally through the target's agent command, volumes as files, real nbdkit exporting the
secondaries on 127.0.0.1, the real NBD Sender and the real native scan (issue 6, host part)."""
import hashlib
import json
import os
import shutil
import subprocess
import textwrap
import sys
import time

import pytest

needs_nbdkit_mark = pytest.mark.skipif(not shutil.which("nbdkit"), reason="nbdkit not installed (scripts/setup installs it)")
pytestmark = needs_nbdkit_mark

MiB = 1 << 20
SIZE = 16 * MiB


class Systems:
    def __init__(self, tmp):
        self.tmp = tmp
        self.A, self.B = str(tmp / "A"), str(tmp / "B")
        self.env = dict(os.environ, RCOPY_ALLOW_NONROOT="1")
        self.env.pop("RCOPY_FAULT", None)
        self.vols = {}

    def rcopy(self, *args, state=None, env=None, check=True):
        r = subprocess.run([sys.executable, "-m", "rcopy", "--state-dir", state or self.A, *args],
                           capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=300)
        if check and r.returncode:
            raise AssertionError(f"rcopy {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def status(self, state=None):
        return json.loads(self.rcopy("status", "--json", state=state).stdout)

    def volume(self, name, data_mib=4):
        p, s = str(self.tmp / f"{name}.img"), str(self.tmp / f"{name}-sec.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
            f.write(os.urandom(data_mib * MiB))
        with open(s, "wb") as f:
            f.truncate(SIZE)
        self.vols[p] = s
        return p, s

    def write_random(self, path, blocks, seed):
        rnd = __import__("random").Random(seed)
        with open(path, "r+b") as f:
            for _ in range(blocks):
                f.seek(rnd.randrange(SIZE // 4096) * 4096)
                f.write(os.urandom(4096))

    def wait_backup_idle(self, group="g"):
        """The orphaned agent rolls back by itself; wait until it let go of the group."""
        for _ in range(600):
            g = [x for x in self.status(self.B)["groups"] if x["name"] == group][0]
            if not g["syncing_generation"]:
                return g
            time.sleep(0.1)
        raise AssertionError("backup never finished its rollback")


def sha(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def snap(primary, gen, group="g"):
    name = os.path.basename(primary).replace(".", "-")
    return os.path.join(os.path.dirname(primary), f"rcopy.{group}.{name}.P{gen}")


def two_systems(tmp_path) -> Systems:
    """A and B, B a target of A, group g (period 5m, auto_recover) with two admitted file volumes."""
    s = Systems(tmp_path)
    s.rcopy("target", "create", "backup", "--link", "127.0.0.1",
            "--agent", f"{sys.executable} -m rcopy --state-dir {s.B} agent")
    s.rcopy("group", "create", "g", "--target", "backup", "--period", "5m", "--policy", "auto_recover")
    for n in ("v1", "v2"):
        p, sec = s.volume(n)
        s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    return s


@pytest.fixture
def sys2(tmp_path):
    return two_systems(tmp_path)


def _started(s):
    s.rcopy("group", "start", "g", "--wait")
    return s


def test_set_up_mirrors_itself_and_initial_then_delta_sync(sys2):
    s = sys2
    b = s.status(s.B)["groups"]
    assert [(g["name"], g["role"]) for g in b] == [("g", "secondary")]
    assert sorted(v["local"] for v in b[0]["volumes"]) == sorted(s.vols.values())
    _started(s)
    for p, sec in s.vols.items():
        assert sha(sec) == sha(snap(p, 1)) == sha(p)
    st = s.status()["groups"][0]
    assert st["state"] == "started" and st["sync_point"]["generation"] == 1 and st["period"] == 300
    assert all(v["full_reason"] == "initial sync" and v["bytes_sent"] == 4 * MiB for v in st["volumes"])
    for rnd in range(2):
        for i, p in enumerate(s.vols):
            s.write_random(p, 20, seed=rnd * 10 + i)
        out = s.rcopy("sync", "g", "--wait").stdout
        assert f"sync point {rnd + 2} committed" in out
        for p, sec in s.vols.items():
            assert sha(sec) == sha(snap(p, rnd + 2))
            assert not os.path.exists(snap(p, rnd + 1))            # the old base went after the commit
        st = s.status()["groups"][0]
        for v in st["volumes"]:
            assert v["full_reason"] == "" and 0 < v["bytes_sent"] <= 20 * 4096   # changed bytes, not the volume
        assert "every secondary equals sync point" in s.rcopy("verify", "g").stdout
    assert not [f for f in os.listdir(s.tmp) if ".R" in f]                  # no rollback snapshot left


def test_a_second_link_carries_data_and_is_recorded_up(sys2):
    """A target with two links (two loopback addresses): the backup exports on both, the primary's
    connections are spread over them, and the link that only carried data is recorded up."""
    s = _started(sys2)
    s.rcopy("link", "add", "backup", "127.0.0.2")
    for i, p in enumerate(s.vols):
        s.write_random(p, 64, seed=90 + i)
    s.rcopy("sync", "g", "--wait")
    links = {l["address"]: l["state"] for l in s.status()["targets"][0]["links"]}
    assert links == {"127.0.0.1": "up", "127.0.0.2": "up"}, links
    for p, sec in s.vols.items():
        assert sha(sec) == sha(snap(p, 2))


def test_verify_reports_a_difference(sys2):
    s = _started(sys2)
    sec = next(iter(s.vols.values()))
    with open(sec, "r+b") as f:
        f.write(b"corrupt")
    r = s.rcopy("verify", "g", check=False)
    assert r.returncode == 15 and "DIFFERENT" in r.stdout and r.stderr.count("\n") == 1


def test_primary_killed_mid_sync_backup_rolls_back_and_next_sync_reconciles(sys2):
    s = _started(sys2)
    before = {sec: sha(sec) for sec in s.vols.values()}
    for i, p in enumerate(s.vols):
        s.write_random(p, 30, seed=100 + i)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "after-send"}, check=False)
    assert r.returncode == 99                                          # died after the first volume's data went
    s.wait_backup_idle()
    assert {sec: sha(sec) for sec in s.vols.values()} == before      # the whole group at sync point 1
    st = s.status()["groups"][0]
    assert "interrupted" in st["reason"] and not st["syncing"]
    s.rcopy("sync", "g", "--wait")
    st = s.status()["groups"][0]
    assert st["sync_point"]["generation"] == 2 and all(v["full_reason"] == "" for v in st["volumes"])
    s.rcopy("verify", "g")


def test_primary_killed_after_backup_commit_finishes_its_commit(sys2):
    s = _started(sys2)
    for p in s.vols:
        s.write_random(p, 5, seed=7)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "after-peer-commit"}, check=False)
    assert r.returncode == 99
    s.wait_backup_idle()
    assert s.status(s.B)["groups"][0]["sync_point"]["generation"] == 2
    s.rcopy("sync", "g", "--wait")                                    # reconciles to 2, then syncs 3
    assert s.status()["groups"][0]["sync_point"]["generation"] == 3
    s.rcopy("verify", "g")


def test_agent_killed_mid_sync_stops_the_group_with_a_reason_then_recovers(sys2):
    s = _started(sys2)
    before = {sec: sha(sec) for sec in s.vols.values()}
    for p in s.vols:
        s.write_random(p, 5, seed=8)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "agent-after-begin"}, check=False)
    assert r.returncode == 15 and r.stderr.count("\n") == 1 and "group stopped" in r.stderr
    st = s.status()["groups"][0]
    assert st["state"] == "stopped" and "link lost" in st["reason"]
    assert {sec: sha(sec) for sec in s.vols.values()} == before
    s.rcopy("sync", "g", "--wait")
    st = s.status()["groups"][0]
    assert st["state"] == "started" and all(v["full_reason"] == "" for v in st["volumes"])
    s.rcopy("verify", "g")


def test_deleted_base_makes_a_full_sync_and_status_says_why(sys2):
    s = _started(sys2)
    p = next(iter(s.vols))
    os.unlink(snap(p, 1))
    s.rcopy("sync", "g", "--wait")
    vols = {v["local"]: v for v in s.status()["groups"][0]["volumes"]}
    assert "base snapshot" in vols[p]["full_reason"] and "missing" in vols[p]["full_reason"]
    assert [v["full_reason"] for k, v in vols.items() if k != p] == [""]
    s.rcopy("verify", "g")


def _one_line_error(r, code):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rcopy: error:") and "Traceback" not in r.stderr


def test_bad_input_is_one_line_with_its_own_code_and_changes_nothing(sys2, tmp_path):
    s = sys2
    other, other_sec = s.volume("other")
    with open(other_sec, "r+b") as f:
        f.write(b"precious data")
    small = str(tmp_path / "small.img")
    with open(small, "wb") as f:
        f.truncate(SIZE // 2)
    v1 = next(iter(s.vols))
    snapshot_before = (s.status(), s.status(s.B))
    cases = [
        (("group", "create", "g2", "--target", "nope"), 3),
        (("sync", "nope", "--wait"), 3),
        (("group", "admit", "g", other, f"backup:{other_sec}"), 6),       # secondary holds data
        (("group", "admit", "g", other, f"backup:{small}"), 5),           # another size
        (("group", "admit", "g", v1, f"backup:{small}"), 4),               # already in a group
        (("group", "create", "g2", "--target", "backup", "--period", "5x"), 2),
        (("group", "create", "g2", "--target", "backup", "--period", "10s"), 2),
        (("sync", "g", "--wait"), 5),                                       # never started
    ]
    for args, code in cases:
        _one_line_error(s.rcopy(*args, check=False), code)
    assert (s.status(), s.status(s.B)) == snapshot_before
    s.rcopy("target", "create", "dead", "--link", "192.0.2.1", "--agent", "sh -c 'exit 255'")
    _one_line_error(s.rcopy("group", "create", "g3", "--target", "dead", check=False), 10)
    assert [g["name"] for g in s.status()["groups"]] == ["g"]
    _started(s)
    _one_line_error(s.rcopy("group", "admit", "g", other, f"backup:{other_sec}", "--force", check=False), 5)
    r = s.rcopy("group", "start", "g", check=False)
    _one_line_error(r, 5)


def test_sync_refused_while_one_runs(sys2):
    s = _started(sys2)
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time\nfrom rcopy.state import Store\n"
                               "fd = Store(sys.argv[1]).try_lock('g'); print(fd is not None, flush=True); time.sleep(60)",
                               s.A], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        _one_line_error(s.rcopy("sync", "g", "--wait", check=False), 8)
        _one_line_error(s.rcopy("sync", "g", check=False), 8)
    finally:
        holder.kill()
        holder.wait()


def test_non_root_is_refused(sys2):
    env = {k: v for k, v in sys2.env.items() if k != "RCOPY_ALLOW_NONROOT"}
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "rcopy",
               "--state-dir", sys2.A, "status"]
    else:
        cmd = [sys.executable, "-m", "rcopy", "--state-dir", sys2.A, "status"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    _one_line_error(r, 7)


def test_background_sync_and_status_text(sys2):
    s = _started(sys2)
    for p in s.vols:
        s.write_random(p, 5, seed=9)
    out = s.rcopy("sync", "g").stdout
    assert "sync point 2 started" in out
    for _ in range(600):
        st = s.status()["groups"][0]
        if st["sync_point"]["generation"] == 2 and not st["syncing"]:
            break
        time.sleep(0.1)
    assert st["sync_point"]["generation"] == 2
    text = s.rcopy("status").stdout
    assert "Group g" in text and "synced" in text and "Target backup" in text
    assert "sync point 2" in text


def test_dry_run_prints_the_plan_that_runs_and_status_reports_the_sync(sys2):
    """Issue 10: the plan is made from the backup's answer, so --dry-run is the truth; status --json
    reports the last sync's seconds per phase and the external commands run on each side."""
    s = _started(sys2)
    first, second = list(s.vols)
    os.unlink(snap(first, 1))                              # v1's base is gone: full, with the reason
    s.write_random(second, 5, seed=1)                      # v2: a delta
    dry = s.rcopy("sync", "g", "--dry-run").stdout.strip().splitlines()
    assert any("v1-img: full sync" in line and "rcopy.g.v1-img.P1 is missing" in line for line in dry), dry
    assert any("v2-img: send blocks changed between rcopy.g.v2-img.P1 and rcopy.g.v2-img.P2" in line for line in dry)
    assert s.status()["groups"][0]["sync_point"]["generation"] == 1          # a dry run changes nothing
    s.rcopy("sync", "g", "--wait")
    g = s.status()["groups"][0]
    rep = g["last_sync"]
    assert rep["plan"] == dry
    assert rep["generation"] == 2 and rep["bytes_sent"] == sum(v["bytes_sent"] for v in g["volumes"])
    assert set(rep["phases"]) == {"begin", "cut", "send", "commit"} and all(t >= 0 for t in rep["phases"].values())
    assert rep["setup_seconds"] > 0                     # the agent's connect at least, outside every phase
    # the file back-end copies with cp: two P snapshots here, two R snapshots and nbdkit on the backup
    assert rep["commands_by_tool"].get("cp") == 2 and rep["commands"] >= 3
    assert rep["processes"] == rep["commands"]          # no LVM here: every command was a process
    assert rep["peer_commands"] >= 3 and rep["peer_processes"] == rep["peer_commands"]
    assert "v1-img" in rep["volumes"] and "missing" in rep["volumes"]["v1-img"]["full_reason"]


def test_sync_wait_starts_the_backups_agent_before_importing_the_sync_machinery(sys2):
    """Issue 15: ssh and the agent's start-up overlap this process's own imports (rcopy.app.reach); the
    early channel is the sync's (its command counted), and a sync refused at once closes it."""
    s = _started(sys2)
    s.write_random(list(s.vols)[0], 3, seed=7)
    spy = textwrap.dedent(f"""
        import sys
        from rcopy.transport import peer
        init = peer.Peer.__init__
        def spied(self, *a, **k):
            print("machinery imported when the agent started:", "rcopy.app.session" in sys.modules, flush=True)
            init(self, *a, **k)
        peer.Peer.__init__ = spied
        from rcopy.cli.main import main
        sys.exit(main(["--state-dir", {s.A!r}, "sync", sys.argv[1], "--wait"]))
    """)
    r = subprocess.run([sys.executable, "-c", spy, "g"], capture_output=True, text=True, env=s.env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "machinery imported when the agent started: False", r.stdout
    rep = s.status()["groups"][0]["last_sync"]
    assert rep["generation"] == 2 and rep["commands_by_tool"].get(os.path.basename(sys.executable)) == 1, rep
    s.rcopy("group", "create", "h", "--target", "backup")                  # never started: refused
    r = subprocess.run([sys.executable, "-c", spy, "h"], capture_output=True, text=True, env=s.env, timeout=300)
    assert r.returncode not in (0, 1) and "Traceback" not in r.stderr and "start" in r.stderr, r.stderr
    assert r.stdout.splitlines() == ["machinery imported when the agent started: False"], r.stdout
    assert s.status(s.B)["groups"][0]["sync_point"]["generation"] == 2     # the early agent changed nothing


def test_a_crashed_primary_sync_is_never_stuck(sys2):
    """Issue 11 #1: after the primary died mid-sync (RCOPY_FAULT=after-send) the group is not stuck:
    the daemon's next tick reconciles it and syncs on, and stop and start work without an admin's sync."""
    s = _started(sys2)
    for p in s.vols:
        s.write_random(p, 5, seed=21)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "after-send"}, check=False)
    assert r.returncode == 99
    s.wait_backup_idle()
    st = s.status()["groups"][0]
    assert st["state"] == "started" and st["syncing_generation"] == 2 and not st["syncing"]
    s.rcopy("daemon", "--once")                              # the next tick: reconcile, then sync
    st = s.status()["groups"][0]
    # sync point 2 was rolled back and taken again: committed as 2 (ids differ)
    assert (st["state"], st["sync_point"]["generation"], st["syncing_generation"]) == ("started", 2, 0), st
    s.rcopy("verify", "g")
    # the same crash, then the administrator stops and starts the group: both just work
    for p in s.vols:
        s.write_random(p, 5, seed=22)
    assert s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "after-send"}, check=False).returncode == 99
    s.wait_backup_idle()
    s.rcopy("group", "stop", "g")
    st = s.status()["groups"][0]
    assert st["state"] == "stopped" and st["syncing_generation"] == 0 and st["sync_point"]["generation"] == 2
    s.rcopy("group", "start", "g", "--wait")
    st = s.status()["groups"][0]
    assert st["state"] == "started" and st["sync_point"]["generation"] == 3
    assert all(v["full_reason"] == "" for v in st["volumes"])
    s.rcopy("verify", "g")


def test_an_unreachable_target_stops_the_group_with_the_reason(sys2):
    """Issue 11 #2: the target unreachable at sync time stops the group, says why, and types the fault
    as a link fault (auto_recover retries it when a link answers again)."""
    s = _started(sys2)
    s.rcopy("target", "create", "gone", "--link", "127.0.0.1", "--agent", "/nonexistent/agent")
    db = os.path.join(s.A, "rcopy.db")
    import sqlite3
    with sqlite3.connect(db) as c:                            # point g at a target that cannot answer
        c.execute("UPDATE groups SET target='gone' WHERE name='g'")
    r = s.rcopy("sync", "g", "--wait", check=False)
    _one_line_error(r, 10)
    st = s.status()["groups"][0]
    assert st["state"] == "stopped" and "unreachable" in st["reason"], st
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT fault FROM groups WHERE name='g'").fetchone()[0] == "link"
        c.execute("UPDATE groups SET target='backup' WHERE name='g'")
    s.rcopy("sync", "g", "--wait")                            # the link is back: the next sync is a delta
    st = s.status()["groups"][0]
    assert st["state"] == "started" and all(v["full_reason"] == "" for v in st["volumes"])


def test_the_same_device_is_not_admitted_twice_through_an_alias(sys2, tmp_path):
    """Issue 11 #8: volumes are identified by their device, not by the path string."""
    s = sys2
    v1, sec1 = next(iter(s.vols.items()))
    alias = str(tmp_path / "alias.img")
    os.symlink(v1, alias)
    s.rcopy("group", "create", "h", "--target", "backup")
    other, other_sec = s.volume("other")
    r = s.rcopy("group", "admit", "h", alias, f"backup:{other_sec}", check=False)
    _one_line_error(r, 4)
    assert "the same device" in r.stderr
    sec_alias = str(tmp_path / "sec-alias.img")
    os.symlink(sec1, sec_alias)
    r = s.rcopy("group", "admit", "h", other, f"backup:{sec_alias}", check=False)
    _one_line_error(r, 5)
    assert "already the secondary" in r.stderr


def test_the_backups_daemon_rolls_back_a_sync_whose_agent_was_killed(sys2):
    s = _started(sys2)
    before = {sec: sha(sec) for sec in s.vols.values()}
    for i, p in enumerate(s.vols):
        s.write_random(p, 10, seed=300 + i)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "agent-after-begin"}, check=False)
    assert r.returncode != 0
    assert s.status(s.B)["groups"][0]["syncing_generation"] == 2       # nobody left to roll it back
    s.rcopy("daemon", "--once", state=s.B)
    b = s.status(s.B)["groups"][0]
    assert not b["syncing_generation"] and b["sync_point"]["generation"] == 1
    assert {sec: sha(sec) for sec in s.vols.values()} == before


def test_admit_create_refusals_are_one_line_and_admit_nothing(sys2):
    """--create's own refusals, before any LVM is touched (the lab test creates real LVs)."""
    s = sys2
    p, _ = s.volume("v3")
    before = s.status(s.B)["groups"][0]["volumes"]
    for args, code, text in (
            (["backup:/dev/other/x", "--create", "vg-dr"], 2, "--create vg-dr makes /dev/vg-dr/NAME"),
            (["elsewhere", "--create", "vg-dr"], 5, "replicates to backup, not elsewhere"),
            (["backup:app", "--create", "vg-dr", "--nosync"], 5, "a new secondary cannot already equal")):
        r = s.rcopy("group", "admit", "g", p, *args, check=False)
        assert r.returncode == code and text in r.stderr, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert s.status(s.B)["groups"][0]["volumes"] == before
    assert len(s.status()["groups"][0]["volumes"]) == 2


@pytest.mark.parametrize("fault", ["agent-at-status", "agent-at-begin", "agent-stalls-in-begin", "agent-after-begin"])
def test_the_control_link_lost_before_the_begin_is_answered_moves_to_the_other_link(tmp_path, fault):
    """The agent on link 127.0.0.1 answers hello, then its channel dies: at reconcile's first question
    (the link cut after the login), at the begin (the request lost in the link), once the begin is
    on record there (its answer lost), or in the begin while that agent lives on unaware (ssh on a cut
    link), holding the group's lock before the sync is on record: the begin asked again over 127.0.0.2
    joins it (before, it waited 120 s for the lock and failed Busy). The sync commits (what a dead
    agent left in flight is rolled back first); link 1 is recorded down with an alert, link 2 up."""
    s = Systems(tmp_path)
    cut = tmp_path / "cut-link-1"
    agent = (f"sh -c 'if [ {{link}} = 127.0.0.1 ] && [ -e {cut} ]; then export RCOPY_FAULT={fault}; fi; "
             f"exec {sys.executable} -m rcopy --state-dir {s.B} agent'")
    s.rcopy("target", "create", "backup", "--link", "127.0.0.1", "--link", "127.0.0.2", "--agent", agent)
    s.rcopy("group", "create", "g", "--target", "backup", "--period", "5m", "--policy", "auto_recover")
    p, sec = s.volume("v1")
    s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    _started(s)
    s.write_random(p, 16, seed=190)
    cut.touch()
    s.rcopy("sync", "g", "--wait")
    st = s.status()
    assert st["groups"][0]["state"] == "started" and st["groups"][0]["sync_point"]["generation"] == 2
    assert sha(sec) == sha(snap(p, 2))
    links = {link["address"]: link["state"] for link in st["targets"][0]["links"]}
    assert links == {"127.0.0.1": "down", "127.0.0.2": "up"}, links
    alerts = json.loads(s.rcopy("status", "alerts", "--json").stdout)["alerts"]
    assert {(a["kind"], a["object"]) for a in alerts} == {("link_down", "backup/127.0.0.1")}, alerts


def test_a_detached_sync_whose_link_dies_before_begin_records_why(sys2):
    """The only link lost after hello, in a detached sync (`rcopy sync` without --wait, whose output
    nobody reads): the group stops with the reason and fault "link" (auto_recover retries it), the
    backup stays at sync point 1, and the next sync is a delta."""
    s = _started(sys2)
    before = {sec: sha(sec) for sec in s.vols.values()}
    for p in s.vols:
        s.write_random(p, 5, seed=191)
    assert "sync point 2 started" in s.rcopy("sync", "g", env={"RCOPY_FAULT": "agent-at-status"}).stdout
    for _ in range(600):
        st = s.status()["groups"][0]
        if st["state"] != "started":
            break
        time.sleep(0.1)
    assert st["state"] == "stopped" and "the sync did not begin" in st["reason"], st
    import sqlite3
    with sqlite3.connect(os.path.join(s.A, "rcopy.db")) as c:
        assert c.execute("SELECT fault FROM groups WHERE name='g'").fetchone()[0] == "link"
    assert {sec: sha(sec) for sec in s.vols.values()} == before
    s.rcopy("sync", "g", "--wait")
    st = s.status()["groups"][0]
    assert st["state"] == "started" and st["sync_point"]["generation"] == 2
    assert all(v["full_reason"] == "" for v in st["volumes"])
    s.rcopy("verify", "g")
