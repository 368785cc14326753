"""Issue 6 in the lab, through the CLI as an admin types it: a group of a thin and a thick volume on
`primary` replicated to `backup` over the replication link (real LVM, device-mapper, nbdkit, ssh).

Each test starts from clean_lab (empty disks, no rcopy state). Hashes compare every secondary (read on
the backup) with the primary snapshot of the same sync point (read on the primary).
"""
import json
import shlex

import pytest

from tests.lab.dm_guest import run_guest

pytestmark = pytest.mark.lab

VG, MIB = "rcopytest", 48
VOLS = ("thinvol", "thickvol")
# The agent gives up 20 s after the primary went silent mid-sync (default 200 s, 3PAR's target timeout).
AGENT = "ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 root@{link} env RCOPY_AGENT_TIMEOUT=20 rcopy agent"

SETUP = f"""
vg()
thin_volume("thinvol", {MIB})
thick_volume("thickvol", {MIB})
"""


def rc(lab, *args, host="primary", check=True, env=""):
    cmd = (env + " " if env else "") + "rcopy " + " ".join(shlex.quote(a) for a in args)
    r = lab.run(host, cmd, check=False, timeout=900)
    if check and r.returncode:
        raise AssertionError(f"{host}: {cmd} -> {r.returncode}: {r.stderr.strip()}")
    return r


def status(lab, host="primary"):
    return json.loads(rc(lab, "status", "--json", host=host).stdout)["groups"][0]


def dev(name):
    return f"/dev/{VG}/{name}"


def sha(lab, host, path):
    return lab.run(host, f"sha256sum {path}").stdout.split()[0]


def write_random(lab, blocks, seed):
    """Random 4 KiB blocks on every primary volume (O_DIRECT); returns the bytes written per volume."""
    out = run_guest(lab, f"""
import random
rnd = random.Random({seed})
for v in {list(VOLS)!r}:
    idx = rnd.sample(range(1, {MIB} * 256), {blocks})      # block 0 is the sequence writer's
    write_blocks("/dev/{VG}/" + v, {{i: rnd.randbytes(BLOCK) for i in idx}})
OUT["bytes"] = {blocks} * BLOCK
""")
    return out["bytes"]


def assert_secondaries_equal_sync_point(lab, gen):
    for v in VOLS:
        assert sha(lab, "backup", dev(v)) == sha(lab, "primary", dev(f"rcopy.g.{v}.P{gen}")), \
            f"{v}: secondary differs from sync point {gen}"


def group(lab, period=None, agent=None):
    run_guest(lab, SETUP, "primary")
    run_guest(lab, SETUP, "backup")
    run_guest(lab, "\n".join(f"fill_random('/dev/{VG}/{v}', 8, seed={i})" for i, v in enumerate(VOLS)), "primary")
    rc(lab, "target", "create", "backup", "--link", "backup", *(["--agent", agent] if agent else []))
    rc(lab, "target", "create", "primary", "--link", "primary", host="backup")
    rc(lab, "group", "create", "g", "--target", "backup", *(["--period", period] if period else []),
       "--policy", "auto_recover,over_per_alert")
    for v in VOLS:
        rc(lab, "group", "admit", "g", dev(v), f"backup:{dev(v)}")
    rc(lab, "group", "start", "g", "--wait")
    return status(lab)


WRITER = f"""
import os, sys, mmap, time
fds = [os.open(p, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) for p in ("/dev/{VG}/thinvol", "/dev/{VG}/thickvol")]
buf = mmap.mmap(-1, 4096)
k = 0
while True:
    k += 1
    for fd in fds:                      # k to the thin volume, THEN k to the thick one
        buf.seek(0)
        buf.write(k.to_bytes(8, "little") * 512)
        os.pwrite(fd, buf, 0)
    time.sleep(0.01)                    # between pairs: the 1-vCPU guest still runs the sync beside it
"""


def sequence_numbers(lab, host, paths):
    out = lab.run(host, "python3 -c 'import sys\nfor p in sys.argv[1:]: print(int.from_bytes(open(p, \"rb\").read(8), \"little\"))' "
                  + " ".join(paths)).stdout.split()
    return [int(x) for x in out]


def test_mixed_group_is_cut_at_one_instant_over_six_syncs(clean_lab):
    """Issue 10: a thin and a thick volume, a writer alternating O_DSYNC sequence numbers between them;
    after every sync the backup's pair (b on thick, a on thin) satisfies b <= a <= b + 1. Also: the
    dry-run plan is the plan that runs, and status reports seconds per phase and commands per side."""
    lab = clean_lab
    g = group(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 1
    assert [v["full_reason"] for v in g["volumes"]] == ["initial sync"] * 2
    assert [v["backend"] for v in g["volumes"]] == ["thin", "cow"]
    assert status(lab, "backup")["role"] == "secondary"
    assert_secondaries_equal_sync_point(lab, 1)
    lab.run("primary", f"cat > /tmp/writer.py <<'EOF'\n{WRITER}\nEOF\n"
                       "nohup python3 /tmp/writer.py </dev/null >/dev/null 2>&1 & echo $! >/tmp/writer.pid")
    seen = []
    try:
        for rnd in range(6):
            changed = write_random(lab, 40, seed=rnd)
            if rnd == 0:
                dry = rc(lab, "sync", "g", "--dry-run").stdout.strip().splitlines()
            rc(lab, "sync", "g", "--wait")
            g = status(lab)
            assert g["sync_point"]["generation"] == rnd + 2
            if rnd == 0:
                assert g["last_sync"]["plan"] == dry, (dry, g["last_sync"]["plan"])
            report = g["last_sync"]
            assert set(report["phases"]) == {"begin", "cut", "send", "commit"}
            assert report["commands"] > 0 and report["peer_commands"] > 0
            print(f"sync {rnd + 2}: phases {report['phases']} commands {report['commands']} "
                  f"peer {report['peer_commands']} by tool {report['commands_by_tool']}")
            for v in g["volumes"]:
                assert v["full_reason"] == ""
                assert changed <= v["bytes_sent"] <= 4 * changed + 8192, (v["name"], v["bytes_sent"], changed)
            a, b = sequence_numbers(lab, "backup", [dev("thinvol"), dev("thickvol")])
            assert b <= a <= b + 1, f"sync point {rnd + 2}: thin holds {a}, thick holds {b}: not one instant"
            seen.append(a)
            assert_secondaries_equal_sync_point(lab, rnd + 2)
    finally:
        lab.run("primary", "kill $(cat /tmp/writer.pid)", check=False)
    assert seen == sorted(seen) and seen[-1] > seen[0] > 0, seen          # the writer ran through the syncs
    rc(lab, "verify", "g")


def test_a_sync_with_nothing_written_confirms_the_sync_point_and_any_write_makes_a_new_one(clean_lab):
    """Issue 15: nothing written to either volume since sync point 1 (thin_delta against the live
    origin, the thick base's empty COW table): the sync confirms 1 current, takes no snapshot and
    sends nothing. A write to one volume, even of the bytes it already held, makes a new sync point
    of the whole group. The target keeps its ssh connection between syncs (``--ssh-persist``): the
    first sync leaves a master running, the later ones go through it."""
    lab = clean_lab
    g = group(lab)
    cut1 = g["sync_point"]["cut"]
    rc(lab, "target", "set", "backup", "--ssh-persist", "300")
    check_master = "ssh -O check -o ControlPath=/run/rcopy/ssh-%C root@backup"
    assert lab.run("primary", check_master, check=False).returncode != 0       # none before
    rc(lab, "sync", "g", "--wait")
    master = lab.run("primary", check_master, check=False)
    assert master.returncode == 0 and "Master running" in master.stderr, master
    g = status(lab)
    rep = g["last_sync"]
    assert rep["confirmed"] and g["sync_point"]["generation"] == 1 and g["sync_point"]["cut"] > cut1, g
    assert set(rep["phases"]) == {"check"} and rep["bytes_sent"] == 0, rep
    assert not {"lvcreate", "lvremove", "lvchange"} & set(rep["commands_by_tool"]), rep["commands_by_tool"]
    assert "confirmed current" in rc(lab, "status").stdout
    assert status(lab, "backup")["sync_point"]["generation"] == 1
    assert_secondaries_equal_sync_point(lab, 1)
    # the same bytes written back over thin block 5: a write all the same
    run_guest(lab, f"""
p = '/dev/{VG}/thinvol'
with open(p, 'rb') as f:
    f.seek(5 * BLOCK)
    same = f.read(BLOCK)
write_blocks(p, {{5: same}})
""")
    assert "nothing written" not in rc(lab, "sync", "g", "--dry-run").stdout
    rc(lab, "sync", "g", "--wait")
    g = status(lab)
    assert g["sync_point"]["generation"] == 2 and not g["last_sync"]["confirmed"]
    assert [v["full_reason"] for v in g["volumes"]] == ["", ""]
    assert_secondaries_equal_sync_point(lab, 2)
    write_random(lab, 3, seed=77)                     # both written: an ordinary delta, then quiet again
    rc(lab, "sync", "g", "--wait")
    rc(lab, "sync", "g", "--wait")
    g = status(lab)
    assert g["sync_point"]["generation"] == 3 and g["last_sync"]["confirmed"]
    rc(lab, "verify", "g")
    again = lab.run("primary", check_master, check=False)
    assert again.returncode == 0 and again.stderr == master.stderr, again       # the same master all along
    lab.run("primary", "ssh -O exit -o ControlPath=/run/rcopy/ssh-%C root@backup", check=False)


def test_sigkill_inside_the_cut_leaves_no_origin_suspended(clean_lab):
    """Issue 10: the primary's rcopy killed between suspend and resume; the next rcopy command resumes
    the origins, and the next sync completes by delta."""
    lab = clean_lab
    group(lab)
    write_random(lab, 10, seed=3)
    r = rc(lab, "sync", "g", "--wait", env="RCOPY_FAULT=in-cut", check=False)
    assert r.returncode == 99, (r.returncode, r.stderr)
    suspended = lambda: lab.run("primary", "dmsetup info -c --noheadings -o name,suspended").stdout
    assert f"{VG}-thinvol:Suspended" in suspended() and f"{VG}-thickvol:Suspended" in suspended()
    rc(lab, "status")                                  # any command: the origins come back
    assert "Suspended" not in suspended()
    rc(lab, "sync", "g", "--wait")
    g = status(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 2
    assert [v["full_reason"] for v in g["volumes"]] == ["", ""]
    assert_secondaries_equal_sync_point(lab, 2)


def test_link_cut_mid_sync_rolls_back_then_delta_after_link_up(clean_lab):
    """Both links of the target cut in the middle of a sync: rolled back; past the target timeout the
    target has failed (alert, and the group's reason); auto_recover resumes by delta at link up."""
    lab = clean_lab
    group(lab, agent=AGENT)
    rc(lab, "link", "add", "backup", "backup-2")
    rc(lab, "link", "add", "primary", "primary-2", host="backup")
    before = {v: sha(lab, "backup", dev(v)) for v in VOLS}
    write_random(lab, 2000, seed=5)
    lab.throttle("primary", "16mbit")         # ~8 s of sending: the cut below lands inside it
    lab.run("primary", "nohup rcopy sync g --wait </dev/null >/tmp/sync.out 2>&1 & echo $! >/tmp/sync.pid")
    if not lab.stall_after("primary", 1 << 20, "/tmp/sync.pid"):       # 1 MiB of data out, then a dead link
        pytest.fail("the sync ended before it sent 1 MiB: " + lab.run("primary", "cat /tmp/sync.out").stdout)
    lab.link(False)
    lab.run("primary", "while kill -0 $(cat /tmp/sync.pid) 2>/dev/null; do sleep 1; done", timeout=600)
    lab.throttle("primary", None)
    g = status(lab)
    assert g["state"] == "stopped" and g["reason"], g
    # the abort removed the half-sent sync point's snapshots (a send that failed half-way once kept its
    # change scan open on them, and the thick volume's P2 stayed behind)
    lvs = lab.run("primary", f"lvs --noheadings -o lv_name {VG}").stdout.split()
    assert [n for n in lvs if n.startswith("rcopy.")] == [f"rcopy.g.{v}.P1" for v in sorted(VOLS)], lvs
    lab.run("backup", "for i in $(seq 300); do rcopy status --json | grep -q '\"syncing_generation\": 0' && exit 0; "
                      "sleep 1; done; exit 1", timeout=400)
    assert {v: sha(lab, "backup", dev(v)) for v in VOLS} == before      # the whole group at sync point 1
    # auto_recover: the daemon, started while the link is down, resumes the group by itself when the
    # kernel reports the link up (its carrier watch), by delta
    # (its next look on its own would be 10 minutes away: only the link event can start the sync below)
    rc(lab, "target", "set", "backup", "--target-timeout", "10")
    lab.run("primary", "RCOPY_RECOVER_RETRY=600 nohup rcopy daemon >/tmp/daemon.log 2>&1 </dev/null & "
                       "echo $! >/tmp/daemon.pid")
    lab.run("primary", "for i in $(seq 300); do grep -q 'auto_recover waits' /tmp/daemon.log && exit 0; sleep 0.5; "
                       "done; exit 1", timeout=200)
    # every link down past the target's timeout (10 s here, 200 s by default): the target has failed
    lab.run("primary", "for i in $(seq 120); do rcopy status alerts --json | grep -q '\"target_failed\"' && exit 0; "
                       "sleep 1; done; exit 1", timeout=200)
    g = status(lab)
    assert g["state"] == "stopped" and g["reason"].startswith("target failed: backup unreachable on every link"), g
    lab.link(True)
    lab.run("primary", "for i in $(seq 300); do rcopy status --json | python3 -c 'import json, sys; "
                       "g = json.load(sys.stdin)[\"groups\"][0]; sys.exit(g[\"state\"] != \"started\" or "
                       "g[\"sync_point\"][\"generation\"] != 2 or g[\"busy\"])' && exit 0; sleep 1; done; exit 1",
            timeout=600)
    lab.run("primary", "kill $(cat /tmp/daemon.pid)")
    daemon_log = lab.run("primary", "cat /tmp/daemon.log").stdout
    nics = lab.run("primary", "cat /run/lab-link /run/lab-link2").stdout.split()   # both came up: either wakes it
    assert any(f"sync (auto_recover: {nic} came up)" in daemon_log for nic in nics), daemon_log
    g = status(lab)
    assert g["state"] == "started" and [v["full_reason"] for v in g["volumes"]] == ["", ""]
    assert "ALERT target_failed backup" in daemon_log and "target_failed" not in rc(lab, "status", "alerts").stdout
    rc(lab, "verify", "g")


def test_deleted_or_overflowed_base_makes_the_next_sync_full_and_status_says_why(clean_lab):
    lab = clean_lab
    group(lab)
    lab.run("primary", f"lvremove -qq -f {VG}/rcopy.g.thinvol.P1")
    write_random(lab, 10, seed=7)
    rc(lab, "sync", "g", "--wait")
    vols = {v["name"]: v for v in status(lab)["volumes"]}
    assert "rcopy.g.thinvol.P1 is missing" in vols["thinvol"]["full_reason"]
    assert vols["thickvol"]["full_reason"] == ""
    assert "missing" in rc(lab, "status").stdout
    assert_secondaries_equal_sync_point(lab, 2)
    # a thick P(n) whose COW store overflowed (more than half the volume rewritten) is no base either
    run_guest(lab, f"fill_random('/dev/{VG}/thickvol', {MIB}, seed=11)", "primary")
    rc(lab, "sync", "g", "--wait")
    vols = {v["name"]: v for v in status(lab)["volumes"]}
    assert "no longer usable" in vols["thickvol"]["full_reason"] and vols["thinvol"]["full_reason"] == ""
    assert_secondaries_equal_sync_point(lab, 3)


def _refused(r, code):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rcopy: error:"), r.stderr


def test_bad_input_is_refused_with_nothing_changed(clean_lab):
    lab = clean_lab
    run_guest(lab, SETUP + f'thick_volume("fsvol", {MIB})\nthick_volume("small", {MIB // 2})\nthick_volume("extra", {MIB})', "backup")
    run_guest(lab, SETUP + f'thick_volume("extra", {MIB})', "primary")
    lab.run("backup", f"mkfs.ext4 -q {dev('fsvol')}")
    rc(lab, "target", "create", "backup", "--link", "backup")
    rc(lab, "group", "create", "g", "--target", "backup")
    rc(lab, "group", "admit", "g", dev("thinvol"), f"backup:{dev('thinvol')}")
    before = (rc(lab, "status", "--json").stdout, rc(lab, "status", "--json", host="backup").stdout)
    _refused(rc(lab, "group", "create", "h", "--target", "nope", check=False), 3)
    _refused(rc(lab, "sync", "nope", check=False), 3)
    _refused(rc(lab, "group", "admit", "g", dev("extra"), f"backup:{dev('fsvol')}", check=False), 6)
    _refused(rc(lab, "group", "admit", "g", dev("extra"), f"backup:{dev('small')}", check=False), 5)
    _refused(rc(lab, "group", "admit", "g", dev("thinvol"), f"backup:{dev('extra')}", check=False), 4)
    _refused(rc(lab, "group", "create", "h", "--target", "backup", "--period", "1w", check=False), 2)
    r = lab.run("primary", "setpriv --reuid=65534 --regid=65534 --clear-groups rcopy status", check=False)
    _refused(r, 7)
    assert (rc(lab, "status", "--json").stdout, rc(lab, "status", "--json", host="backup").stdout) == before
    rc(lab, "target", "create", "dead", "--link", "192.0.2.1")
    _refused(rc(lab, "group", "create", "h", "--target", "dead", check=False), 10)
    rc(lab, "group", "start", "g", "--wait")
    _refused(rc(lab, "group", "admit", "g", dev("extra"), f"backup:{dev('extra')}", check=False), 5)
    assert [v["name"] for v in status(lab)["volumes"]] == ["thinvol"]


def test_two_links_carry_the_data_and_one_lost_mid_sync_is_an_alert_not_a_failure(clean_lab):
    """A target with two links (the lab's second NIC pair): the data connections are spread over both;
    link 2 is cut in the middle of a sync, whose data then goes over link 1 (the control channel's):
    the sync commits, the secondaries equal the sync point, status shows link 2 down with a link_down
    alert. With link 2 back, the next sync uses it again and the alert clears. With link 1 down, the
    next sync runs over link 2 alone, control channel included: link 1 is lost in the middle of a sync
    (the control channel's): the channel moves to link 2 and the sync commits there; the next connects
    over link 2 at once."""
    lab = clean_lab
    # the agent waits 120 s for a silent primary (not 20): the channel moves after ssh's 15 s
    group(lab, agent=AGENT.replace("RCOPY_AGENT_TIMEOUT=20", "RCOPY_AGENT_TIMEOUT=120"))
    rc(lab, "link", "add", "backup", "backup-2")
    rc(lab, "link", "add", "primary", "primary-2", host="backup")     # the backup's export admits it
    write_random(lab, 3000, seed=11)
    lab.throttle("primary", "16mbit")         # per link: the cut below lands inside the sending
    lab.run("primary", "rm -f /tmp/sync.rc; (rcopy sync g --wait >/tmp/sync.out 2>&1; echo $? >/tmp/sync.rc) "
                       "</dev/null >/dev/null 2>&1 & echo $! >/tmp/sync.pid")
    assert lab.stall_after("primary", 1 << 20, "/tmp/sync.pid", links=(2,)), lab.run("primary", "cat /tmp/sync.out").stdout
    lab.link(False, 2)
    lab.run("primary", "while [ ! -s /tmp/sync.rc ]; do sleep 1; done", timeout=600)
    lab.throttle("primary", None)
    out = lab.run("primary", "cat /tmp/sync.out; cat /tmp/sync.rc").stdout
    assert out.split()[-1] == "0", out
    assert "link backup-2 to target backup lost during the sync" in out, out
    g = status(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 2, g
    assert_secondaries_equal_sync_point(lab, 2)
    links = {l["address"]: l["state"] for l in json.loads(rc(lab, "status", "links", "--json").stdout)["targets"][0]["links"]}
    assert links == {"backup": "up", "backup-2": "down"}, links
    alerts = json.loads(rc(lab, "status", "alerts", "--json").stdout)["alerts"]
    assert [(a["kind"], a["object"]) for a in alerts] == [("link_down", "backup/backup-2")], alerts
    lab.link(True, 2)
    # big enough, and throttled, that link 2's connection (opened beside link 1's, TLS and all) joins
    # before link 1 alone has sent it all: a link counts as up again once it carried data
    write_random(lab, 3000, seed=12)
    lab.throttle("primary", "16mbit")
    rc(lab, "sync", "g", "--wait")
    lab.throttle("primary", None)
    links = {l["address"]: l["state"] for l in json.loads(rc(lab, "status", "links", "--json").stdout)["targets"][0]["links"]}
    assert links == {"backup": "up", "backup-2": "up"}, links
    assert json.loads(rc(lab, "status", "alerts", "--json").stdout)["alerts"] == []
    assert_secondaries_equal_sync_point(lab, 3)
    # link 1 goes silent in the middle of a sync whose control channel runs on it: the primary reaches
    # the agent over link 2, the agent serving the sync takes that channel, the data goes on over link 2
    write_random(lab, 3000, seed=14)
    lab.throttle("primary", "16mbit")
    lab.run("primary", "rm -f /tmp/sync.rc; (rcopy sync g --wait >/tmp/sync.out 2>&1; echo $? >/tmp/sync.rc) "
                       "</dev/null >/dev/null 2>&1 & echo $! >/tmp/sync.pid")
    assert lab.stall_after("primary", 1 << 20, "/tmp/sync.pid", links=(1,)), lab.run("primary", "cat /tmp/sync.out").stdout
    lab.link(False, 1)
    lab.run("primary", "while [ ! -s /tmp/sync.rc ]; do sleep 1; done", timeout=600)
    lab.throttle("primary", None)
    out = lab.run("primary", "cat /tmp/sync.out; cat /tmp/sync.rc").stdout
    assert out.split()[-1] == "0", out
    assert "moved to link backup-2 and the sync goes on" in out, out
    assert_secondaries_equal_sync_point(lab, 4)
    links = {l["address"]: l["state"] for l in json.loads(rc(lab, "status", "links", "--json").stdout)["targets"][0]["links"]}
    assert links == {"backup": "down", "backup-2": "up"}, links
    # link 1 still down, the group idle: the next sync connects over link 2 and sends there
    write_random(lab, 50, seed=13)
    rc(lab, "sync", "g", "--wait")
    links = {l["address"]: l["state"] for l in json.loads(rc(lab, "status", "links", "--json").stdout)["targets"][0]["links"]}
    assert links == {"backup": "down", "backup-2": "up"}, links
    assert_secondaries_equal_sync_point(lab, 5)
    lab.link(True, 1)
    rc(lab, "verify", "g")
