"""Issue 12 in the lab, through the CLI: failover, recover by delta, restore, on a thin and a thick
volume, with real power cuts of the VMs (``lab.crash``) and real LVM merges.

The backup's agent gives up 20 s after its primary went silent (AGENT); failover does not wait for that:
it stops the stale agent and rolls the sync in flight back itself.
"""
import time

import pytest

from tests.lab.dm_guest import run_guest
from tests.lab.test_replication import AGENT, VG, VOLS, MIB, dev, group, rc, status

pytestmark = pytest.mark.lab


def write_random(lab, host, blocks, seed):
    run_guest(lab, f"""
import random
rnd = random.Random({seed})
for v in {list(VOLS)!r}:
    idx = rnd.sample(range(1, {MIB} * 256), {blocks})
    write_blocks("/dev/{VG}/" + v, {{i: rnd.randbytes(BLOCK) for i in idx}})
""", host)
    return blocks * 4096


def shas(lab, host, names=VOLS):
    out = lab.run(host, "sha256sum " + " ".join(dev(n) for n in names)).stdout.split()
    return out[0::2]


def readable(lab, host, names):
    """Thin snapshots are created with activation skipped: activate them to read them."""
    lab.run(host, "lvchange -ay -K " + " ".join(f"{VG}/{n}" for n in names))


def wait_for(lab, host, pred, what, tries=300):
    for _ in range(tries):
        if pred(status(lab, host)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{host}: never saw {what}")


WRITTEN = ("s=0; for v in " + " ".join(VOLS) + f"; do d=$(readlink -f /dev/{VG}/$v); "
           "read -r _ _ _ _ _ _ ws _ </sys/block/${d##*/}/stat; s=$((s + ws)); done; echo $s")


def sectors_written(lab):
    """Sectors written so far to the backup's secondaries (the send phase shows here)."""
    return int(lab.run("backup", WRITTEN).stdout)


def assert_delta(g, most):
    for v in g["volumes"]:
        assert v["full_reason"] == "", f"{v['name']} went full: {v['full_reason']}"
        assert 0 < v["bytes_sent"] <= most, f"{v['name']}: {v['bytes_sent']} bytes for {most} written"


def test_power_cut_mid_sync_failover_recover_keeps_the_primarys_writes_then_restore(clean_lab):
    lab = clean_lab
    group(lab, agent=AGENT)
    write_random(lab, "primary", 50, seed=1)
    rc(lab, "sync", "g", "--wait")
    point2 = shas(lab, "backup")
    write_random(lab, "primary", 2000, seed=2)               # never replicated: ~8 MiB per volume
    before_cut = shas(lab, "primary")
    lab.throttle("primary", "16mbit")                         # ~8 s of sending: the power cut lands inside it
    rc(lab, "sync", "g")                                      # in the background
    wait_for(lab, "backup", lambda g: g["syncing_generation"] == 3, "sync point 3 begin")
    start = sectors_written(lab)
    for _ in range(600):                                      # until its data lands on the secondaries
        if sectors_written(lab) > start:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the sync never wrote to the backup")
    lab.crash("primary")                                      # power cut during the send

    out = rc(lab, "group", "failover", "g", "-f", host="backup").stdout
    assert "not fenced now" in out
    b = status(lab, "backup")
    assert (b["role"], b["sync_point"]["generation"], b["syncing_generation"]) == ("primary-rev", 2, 0)
    assert shas(lab, "backup") == point2                      # every volume at the previous sync point
    written = write_random(lab, "backup", 40, seed=3)         # the backup serves the data
    now_b = shas(lab, "backup")

    lab.start("primary")
    r = rc(lab, "sync", "g", "--wait", check=False)           # the primary is back: fenced, sends nothing
    assert r.returncode == 17, r.stderr
    out = rc(lab, "group", "recover", "g", "-f", host="backup").stdout
    assert "sync point 3 committed" in out
    b, a = status(lab, "backup"), status(lab, "primary")
    assert (a["role"], b["role"]) == ("secondary-rev", "primary-rev")
    assert_delta(b, written)                                  # what the backup wrote, not the volume
    assert shas(lab, "primary") == now_b
    kept = [f"rcopy.g.{v}.K2" for v in VOLS]
    assert sorted(n for names in a["kept"].values() for n in names) == sorted(kept)
    readable(lab, "primary", [n for n in kept if "thinvol" in n])
    assert shas(lab, "primary", kept) == before_cut           # the un-replicated writes, kept
    rc(lab, "verify", "g", host="backup")

    out = rc(lab, "group", "restore", "g", "-f", host="backup").stdout
    assert "restored" in out
    b, a = status(lab, "backup"), status(lab, "primary")
    assert (a["role"], a["state"], b["role"]) == ("primary", "started", "secondary")
    assert (a["reason"], b["reason"]) == ("", "")           # no stale failover advice after the hand-over
    written = write_random(lab, "primary", 30, seed=4)
    rc(lab, "sync", "g", "--wait")
    assert_delta(status(lab, "primary"), written)
    rc(lab, "verify", "g")


def test_planned_migration_with_a_backup_crash_in_recover_never_goes_full(clean_lab):
    lab = clean_lab
    group(lab, agent=AGENT)
    write_random(lab, "primary", 30, seed=5)
    rc(lab, "sync", "g", "--wait")
    rc(lab, "group", "stop", "g")
    def unchanged():            # status as data: lag_seconds is the clock's, not the state's
        return [{k: v for k, v in status(lab, h).items() if k != "lag_seconds"} for h in ("primary", "backup")]
    before = unchanged()
    for host, code, args in (("primary", 17, ("failover",)), ("backup", 17, ("recover",)),
                             ("backup", 17, ("restore",)), ("primary", 18, ("reverse", "--natural"))):
        r = rc(lab, "group", *args, "g", "-f", host=host, check=False)
        assert r.returncode == code and len(r.stderr.strip().splitlines()) == 1, (args, r.returncode, r.stderr)
    r = rc(lab, "group", "failover", "g", host="backup", check=False)        # no terminal, no -f
    assert r.returncode == 19, r.stderr
    assert unchanged() == before                                              # every refusal changed nothing
    rc(lab, "group", "failover", "g", "-f", host="backup")
    assert status(lab, "primary")["fault"] == "failover"     # reachable: fenced at once
    for host, code, args in (("backup", 17, ("group", "failover", "g", "-f")),
                             ("backup", 18, ("group", "restore", "g", "-f")),
                             ("primary", 17, ("sync", "g", "--wait"))):           # fenced
        r = rc(lab, *args, host=host, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
    write_random(lab, "backup", 600, seed=6)
    lab.throttle("backup", "16mbit")                          # the crash below lands inside the reverse send
    lab.run("backup", "nohup rcopy group recover g -f >/tmp/recover.log 2>&1 &")
    wait_for(lab, "primary", lambda g: g["syncing_generation"] == 3, "the reverse sync begin")
    lab.crash("backup")                                       # mid-recover
    lab.start("backup")
    wait_for(lab, "primary", lambda g: not g["syncing_generation"], "the rollback on primary")
    out = rc(lab, "group", "recover", "g", "-f", host="backup").stdout
    assert "sync point 3 committed" in out
    assert_delta(status(lab, "backup"), 600 * 4096)
    write_random(lab, "backup", 20, seed=7)
    rc(lab, "group", "restore", "g", "-f", host="backup")
    assert_delta(status(lab, "backup"), 20 * 4096)            # the final sync
    assert shas(lab, "primary") == shas(lab, "backup")
    write_random(lab, "primary", 20, seed=8)
    rc(lab, "sync", "g", "--wait")
    assert_delta(status(lab, "primary"), 20 * 4096)
    rc(lab, "verify", "g")
