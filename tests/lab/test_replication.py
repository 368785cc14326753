"""Issue 6 in the lab, through the CLI as an admin types it: a group of a thin and a thick volume on
`primary` replicated to `backup` over the replication link (real LVM, device-mapper, nbdkit, ssh).

Each test starts from clean_lab (empty disks, no rcopy state). Hashes compare every secondary (read on
the backup) with the primary snapshot of the same sync point (read on the primary).
"""
import json
import shlex
import time

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
    idx = rnd.sample(range({MIB} * 256), {blocks})
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


def test_initial_sync_then_three_delta_rounds(clean_lab):
    lab = clean_lab
    g = group(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 1
    assert [v["full_reason"] for v in g["volumes"]] == ["initial sync"] * 2
    assert status(lab, "backup")["role"] == "secondary"
    assert_secondaries_equal_sync_point(lab, 1)
    for rnd in range(3):
        changed = write_random(lab, 40, seed=rnd)
        rc(lab, "sync", "g", "--wait")
        g = status(lab)
        assert g["sync_point"]["generation"] == rnd + 2
        for v in g["volumes"]:
            assert v["full_reason"] == ""
            assert changed <= v["bytes_sent"] <= 4 * changed, (v["name"], v["bytes_sent"], changed)
        assert_secondaries_equal_sync_point(lab, rnd + 2)
        rc(lab, "verify", "g")


def test_link_cut_mid_sync_rolls_back_then_delta_after_link_up(clean_lab):
    lab = clean_lab
    group(lab, agent=AGENT)
    before = {v: sha(lab, "backup", dev(v)) for v in VOLS}
    write_random(lab, 2000, seed=5)
    lab.run("primary", "nohup rcopy sync g --wait </dev/null >/tmp/sync.out 2>&1 & echo $! >/tmp/sync.pid")
    for _ in range(600):
        if status(lab)["syncing"]:
            break
        time.sleep(0.2)
    lab.link(False)
    lab.run("primary", "while kill -0 $(cat /tmp/sync.pid) 2>/dev/null; do sleep 1; done", timeout=600)
    g = status(lab)
    assert g["state"] == "stopped" and g["reason"], g
    lab.run("backup", "for i in $(seq 300); do rcopy status --json | grep -q '\"syncing_generation\": 0' && exit 0; "
                      "sleep 1; done; exit 1", timeout=400)
    assert {v: sha(lab, "backup", dev(v)) for v in VOLS} == before      # the whole group at sync point 1
    lab.link(True)
    rc(lab, "sync", "g", "--wait")
    g = status(lab)
    assert g["state"] == "started" and [v["full_reason"] for v in g["volumes"]] == ["", ""]
    rc(lab, "verify", "g")


def test_deleted_base_makes_the_next_sync_full_and_status_says_why(clean_lab):
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
