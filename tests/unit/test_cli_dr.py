"""Disaster recovery through the CLI on the host (file simulator, two systems in two state dirs, each
reaching the other's agent locally): failover, recover by delta with the demoted primary's writes kept
as K, restore, reverse, and every refusal with its own exit code (issue 12, host part; the lab runs the
same flows on LVM with a power cut)."""
import os
import sys

import pytest

from tests.unit.test_cli_replication import Systems, needs_nbdkit_mark, sha

pytestmark = needs_nbdkit_mark
BLOCKS = 25


class Two(Systems):
    """Systems named 'primary' (state A) and 'backup' (state B), each a target of the other."""

    def rcopy(self, *args, state=None, env=None, check=True):
        name = "backup" if (state or self.A) == self.B else "primary"
        return super().rcopy(*args, state=state, env={"RCOPY_SYSTEM_NAME": name, **(env or {})}, check=check)

    def agent(self, state, name):
        return f"env RCOPY_SYSTEM_NAME={name} {sys.executable} -m rcopy --state-dir {state} agent"

    def group(self, name="g", state=None):
        return [g for g in self.status(state)["groups"] if g["name"] == name][0]

    def shas(self, paths):
        return {p: sha(p) for p in paths}

    def equal(self) -> bool:
        """Every volume pair holds the same bytes."""
        return all(sha(p) == sha(sec) for p, sec in self.vols.items())


def kept_path(vol, kind_gen, group="g"):
    name = os.path.basename(vol).replace(".", "-")
    return os.path.join(os.path.dirname(vol), f"rcopy.{group}.{name}.{kind_gen}")


@pytest.fixture
def two(tmp_path):
    s = Two(tmp_path)
    s.rcopy("target", "create", "backup", "--link", "127.0.0.1", "--agent", s.agent(s.B, "backup"))
    s.rcopy("target", "create", "primary", "--link", "127.0.0.1", "--agent", s.agent(s.A, "primary"), state=s.B)
    s.rcopy("group", "create", "g", "--target", "backup")
    for n in ("v1", "v2"):
        p, sec = s.volume(n)
        s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    s.rcopy("group", "start", "g", "--wait")
    return s


def _writes(s, paths, seed):
    for i, p in enumerate(paths):
        s.write_random(p, BLOCKS, seed=seed + i)


def test_unplanned_failover_recover_keeps_the_primarys_writes_then_restore(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    _writes(s, prim, 10)
    s.rcopy("sync", "g", "--wait")
    point2 = s.shas(sec)
    _writes(s, prim, 20)                                  # never replicated
    unreplicated = s.shas(prim)

    out = s.rcopy("group", "failover", "g", "-f", state=s.B).stdout
    assert "failed over" in out and "primary fenced" in out
    b = s.group(state=s.B)
    assert (b["role"], b["state"], b["failover_point"]) == ("primary-rev", "stopped", 2)
    assert s.shas(sec) == point2                           # exactly the last sync point
    assert all(os.path.exists(kept_path(v, "F2")) for v in sec)
    a = s.group()
    assert a["fault"] == "failover" and "recover" in a["reason"]
    r = s.rcopy("sync", "g", "--wait", check=False)        # the fenced primary sends nothing
    assert r.returncode == 17 and "fenced" in r.stderr and s.shas(sec) == point2

    _writes(s, sec, 30)                                    # the backup serves the data now
    out = s.rcopy("group", "recover", "g", "-f", state=s.B).stdout
    assert "primary is secondary-rev" in out and "sync point 3 committed" in out
    a, b = s.group(), s.group(state=s.B)
    assert (a["role"], b["role"], b["state"]) == ("secondary-rev", "primary-rev", "started")
    for v in b["volumes"]:                                 # a delta from F: what the backup wrote
        assert v["full_reason"] == "" and 0 < v["bytes_sent"] <= BLOCKS * 4096
    assert s.equal()
    for p in prim:                                         # the primary's own writes are kept as K
        assert sha(kept_path(p, "K2")) == unreplicated[p]
    assert set(a["kept"]) == set(prim)
    s.rcopy("verify", "g", state=s.B)

    r = s.rcopy("group", "recover", "g", "-f", state=s.B, check=False)
    assert r.returncode == 18 and "recovered already" in r.stderr
    _writes(s, sec, 40)
    r = s.rcopy("group", "restore", "g", "-f", state=s.B)
    assert "restored" in r.stdout and "WARNING" not in r.stderr, r.stderr       # a clean hand-over is no alert
    a, b = s.group(), s.group(state=s.B)
    assert (a["role"], a["state"], b["role"]) == ("primary", "started", "secondary")
    assert a["reason"] == "" and b["reason"] == "", (a["reason"], b["reason"])  # no stale "failed over" advice
    assert s.equal()
    _writes(s, prim, 50)
    s.rcopy("sync", "g", "--wait")
    a = s.group()
    assert all(v["full_reason"] == "" and v["bytes_sent"] <= BLOCKS * 4096 for v in a["volumes"])
    s.rcopy("verify", "g")
    assert not [f for f in os.listdir(s.tmp) if ".F" in f or ".R" in f]     # only K is left, for the admin
    assert sorted(f for f in os.listdir(s.tmp) if ".K" in f) == sorted(os.path.basename(kept_path(p, "K2"))
                                                                      for p in prim)


def test_planned_migration_moves_no_full_copy_and_ends_equal(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    _writes(s, prim, 1)
    s.rcopy("sync", "g", "--wait")
    s.rcopy("group", "stop", "g")
    s.rcopy("group", "failover", "g", "-f", state=s.B)
    _writes(s, sec, 2)
    s.rcopy("group", "recover", "g", "-f", state=s.B)
    assert all(v["full_reason"] == "" for v in s.group(state=s.B)["volumes"])
    s.rcopy("group", "restore", "g", "-f", state=s.B)
    assert all(v["full_reason"] == "" for v in s.group(state=s.B)["volumes"])   # the final sync too
    assert s.equal()
    s.rcopy("sync", "g", "--wait")
    assert all(v["full_reason"] == "" for v in s.group()["volumes"])
    s.rcopy("verify", "g")


def test_failover_during_a_sync_brings_every_volume_back_to_the_previous_point(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    point1 = s.shas(sec)
    _writes(s, prim, 5)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "after-send"}, check=False)
    assert r.returncode == 99                              # the primary died mid-send
    s.rcopy("group", "failover", "g", "-f", state=s.B)
    b = s.group(state=s.B)
    assert b["sync_point"]["generation"] == 1 and not b["syncing_generation"]
    assert s.shas(sec) == point1


def test_a_failover_first_finishes_the_tidy_up_of_an_agent_dead_after_its_commit(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    _writes(s, prim, 9)
    r = s.rcopy("sync", "g", "--wait", env={"RCOPY_FAULT": "agent-before-tidy"}, check=False)
    assert r.returncode == 0 and "tidy-up did not answer" in r.stderr, r.stderr    # committed all the same
    point2 = s.shas(sec)
    rollback = [kept_path(v, "R1") for v in sec]
    assert all(os.path.exists(p) for p in rollback)       # the dead agent's R snapshots are still there
    s.rcopy("group", "failover", "g", "-f", state=s.B)
    b = s.group(state=s.B)
    assert b["role"] == "primary-rev" and b["sync_point"]["generation"] == 2
    assert not any(os.path.exists(p) for p in rollback) and s.shas(sec) == point2


def test_a_backup_crash_in_recover_is_finished_by_the_next_recover_by_delta(two):
    s = two
    sec = list(s.vols.values())
    s.rcopy("group", "failover", "g", "-f", state=s.B)
    _writes(s, sec, 7)
    r = s.rcopy("group", "recover", "g", "-f", state=s.B, env={"RCOPY_FAULT": "after-send"}, check=False)
    assert r.returncode == 99
    s.rcopy("group", "recover", "g", "-f", state=s.B)
    b = s.group(state=s.B)
    assert b["sync_point"]["generation"] == 2 and b["role"] == "primary-rev"
    assert all(v["full_reason"] == "" and v["bytes_sent"] <= BLOCKS * 4096 for v in b["volumes"])
    assert s.equal()


def test_refusals_have_their_own_codes_and_change_nothing(two, tmp_path):
    s = two

    def snapshot():
        return ([(g["role"], g["state"], g["fault"], g["sync_point"]) for g in s.status()["groups"]],
                [(g["role"], g["state"], g["fault"], g["sync_point"]) for g in s.status(s.B)["groups"]],
                sorted(os.listdir(s.tmp)))

    def refused(code, words, *args, state=None):
        before = snapshot()
        r = s.rcopy(*args, state=state, check=False)
        assert r.returncode == code, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert snapshot() == before

    refused(17, "failover runs on the backup", "group", "failover", "g", "-f")
    refused(17, "recover runs on the system that failed over", "group", "recover", "g", "-f", state=s.B)
    refused(17, "restore runs on the primary-rev side", "group", "restore", "g", "-f", state=s.B)
    refused(18, "stop it first", "group", "reverse", "g", "--current", "-f")
    refused(18, "natural already", "group", "reverse", "g", "--natural", "-f")
    refused(19, "add -f", "group", "failover", "g", state=s.B)             # no terminal, no -f
    refused(2, "--natural", "group", "reverse", "g", "-f")
    s.rcopy("group", "failover", "g", "-f", state=s.B)
    refused(17, "failover runs on the backup", "group", "failover", "g", "-f", state=s.B)
    refused(18, "run 'rcopy group recover g' first", "group", "restore", "g", "-f", state=s.B)
    # the natural primary unreachable: recover needs it
    s.rcopy("target", "remove", "primary", state=s.B, check=False)
    db_agent = s.agent(s.A, "primary").replace(sys.executable, "/nonexistent/python")
    with_bad = dict(state=s.B)
    import sqlite3
    con = sqlite3.connect(os.path.join(s.B, "rcopy.db"))
    con.execute("UPDATE targets SET agent=? WHERE name='primary'", (db_agent,))
    con.commit()
    con.close()
    refused(10, "unreachable", "group", "recover", "g", "-f", **with_bad)


def test_reverse_current_turns_a_stopped_group_and_natural_renames(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    s.rcopy("group", "stop", "g")
    out = s.rcopy("group", "reverse", "g", "--current", "-f").stdout
    assert "direction reversed" in out
    a, b = s.group(), s.group(state=s.B)
    assert (a["role"], b["role"]) == ("secondary-rev", "primary-rev")
    assert all(os.path.exists(kept_path(p, "K1")) for p in prim)      # the old sender's image, kept
    assert all(os.path.exists(kept_path(v, "F1")) for v in sec)       # the new sender's base
    _writes(s, sec, 3)
    s.rcopy("group", "start", "g", "--wait", state=s.B)
    assert all(v["full_reason"] == "" for v in s.group(state=s.B)["volumes"])
    assert s.equal()
    s.rcopy("group", "reverse", "g", "--natural", "-f", state=s.B)
    a, b = s.group(), s.group(state=s.B)
    assert (a["role"], b["role"]) == ("secondary", "primary")
    _writes(s, sec, 4)
    s.rcopy("sync", "g", "--wait", state=s.B)
    s.rcopy("verify", "g", state=s.B)


def test_a_primary_that_was_away_fences_itself_when_it_meets_the_failed_over_backup(two):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    import sqlite3
    con = sqlite3.connect(os.path.join(s.B, "rcopy.db"))     # the natural primary is down: B cannot reach it
    con.execute("UPDATE targets SET agent='/nonexistent/rcopy agent' WHERE name='primary'")
    con.commit()
    con.close()
    out = s.rcopy("group", "failover", "g", "-f", state=s.B).stdout
    assert "not fenced now" in out
    point1 = s.shas(sec)
    _writes(s, prim, 9)
    r = s.rcopy("sync", "g", "--wait", check=False)           # the primary is back and tries its period
    assert r.returncode == 17 and "failed over" in r.stderr
    a = s.group()
    assert a["fault"] == "failover" and a["state"] == "stopped" and not a["syncing_generation"]
    assert s.shas(sec) == point1                              # nothing reached the backup's volumes


@pytest.mark.parametrize("where, flow", [
    ("dr-after-takeover-cut", "failover"),        # F taken, role not yet changed
    ("dr-after-keep-cut", "recover"),              # the primary kept K, nothing rolled back yet
    ("dr-after-one-rollback", "recover"),          # one volume rolled back, the other not
    ("dr-after-handover", "restore"),              # the natural primary took over, the backup did not step down
])
def test_a_crash_inside_a_flow_is_finished_by_running_it_again(two, where, flow):
    s = two
    prim, sec = list(s.vols), list(s.vols.values())
    _writes(s, prim, 60)
    s.rcopy("sync", "g", "--wait")
    if flow != "failover":
        s.rcopy("group", "failover", "g", "-f", state=s.B)
        _writes(s, sec, 61)
    if flow == "restore":
        s.rcopy("group", "recover", "g", "-f", state=s.B)
        _writes(s, sec, 62)
    r = s.rcopy("group", flow, "g", "-f", state=s.B, env={"RCOPY_FAULT": where}, check=False)
    # died there: this process (99), or the natural primary's agent for its steps (a link error here)
    assert r.returncode in (99, 10) and "RCOPY_FAULT" in r.stderr, r.stderr
    if flow == "restore":                                  # the natural primary meets the backup first
        r = s.rcopy("sync", "g", "--wait", check=False)
        assert r.returncode in (0, 17), r.stderr
    s.rcopy("group", flow, "g", "-f", state=s.B)
    a, b = s.group(), s.group(state=s.B)
    want = {"failover": ("primary", "primary-rev"), "recover": ("secondary-rev", "primary-rev"),
            "restore": ("primary", "secondary")}[flow]
    assert (a["role"], b["role"]) == want
    if flow != "failover":
        assert s.equal()
        sender = b if flow == "recover" else a
        for v in sender["volumes"]:
            # a file volume carries no mark (LVM ones do): one rolled back before the crash cannot show
            # it holds the point, and is sent whole, saying why; any other goes by delta
            assert v["full_reason"] == "" or v["full_reason"].endswith("it is not-synced there"), v
        assert sum(bool(v["full_reason"]) for v in sender["volumes"]) <= (where == "dr-after-one-rollback")
    if flow == "restore":
        assert a["fault"] == "" and a["state"] == "started"
        _writes(s, prim, 63)
        s.rcopy("sync", "g", "--wait")
        s.rcopy("verify", "g")
