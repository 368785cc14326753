"""Issue 14 in the lab: rcopy on an LVM set-up it did not make, with secondaries it makes itself.

The primary's LVM sees only its PV through a devices file (``use_devicesfile = 1``), the backup's through
a ``global_filter``: rcopy's LVM commands (one lvm shell per process) must honour what the admin set.
The primary's VG and LV names carry hyphens (device-mapper doubles them: vg--prod-app--db), its thin pool
is shared with another thin LV and that LV's snapshot; the backup has LVs of its own. `group admit
--create` makes the secondaries (thin in VG/POOL, thick in VG), refusing a name that exists and space
that is short. Syncs and verify pass, and nothing rcopy was not given changes (hashes). Then the daemon's
device watch: app-db's device removed under it (dmsetup remove) stops the group with the reason at the
udev event, and the group starts again once the LV is re-activated.
"""
import json
import time

import pytest

from tests.lab.dm_guest import run_guest
from tests.lab.test_replication import rc, sha, status

pytestmark = pytest.mark.lab

PRIMARY = """
sh("pvcreate", "-qq", "-y", "-ff", PV)
sh("vgcreate", "-qq", "-s", "1m", "vg-prod", PV)
sh("lvcreate", "-qq", "-y", "-L", "128m", "-T", "vg-prod/pool-a", "--chunksize", "64k", "-Zn")
for n in ("app-db", "other-1"):
    sh("lvcreate", "-qq", "-y", "-V", "32m", "-T", "vg-prod/pool-a", "-n", n)
fill_random("/dev/vg-prod/app-db", 24, seed=1)
fill_random("/dev/vg-prod/other-1", 8, seed=2)
sh("lvcreate", "-qq", "-s", "-n", "other-1-snap", "vg-prod/other-1")
write_blocks("/dev/vg-prod/other-1", {5: b"after the snapshot".ljust(BLOCK, b".")})
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "32m", "-n", "app-log", "vg-prod")
fill_random("/dev/vg-prod/app-log", 32, seed=3)
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "96m", "-n", "app-big", "vg-prod")
"""

BACKUP = """
sh("pvcreate", "-qq", "-y", "-ff", PV)
sh("vgcreate", "-qq", "-s", "1m", "vg-dr", PV)
sh("lvcreate", "-qq", "-y", "-L", "16m", "-T", "vg-dr/pool-small", "--chunksize", "64k", "-Zn")
sh("lvcreate", "-qq", "-y", "-L", "48m", "-T", "vg-dr/pool-b", "--chunksize", "64k", "-Zn")
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "32m", "-n", "app-log", "vg-dr")       # the admin's own
fill_random("/dev/vg-dr/app-log", 4, seed=4)
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "340m", "-n", "filler", "vg-dr")
OUT["free"] = int(sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", "vg-dr"))
"""

# What the admin set (reset.sh puts the original lvmlocal.conf back).
DEVICES_FILE = ("cp -n /etc/lvm/lvmlocal.conf /etc/lvm/lvmlocal.conf.lab && "
                "printf 'devices {\\n\\tuse_devicesfile = 1\\n}\\n' >>/etc/lvm/lvmlocal.conf")
FILTER = ("cp -n /etc/lvm/lvmlocal.conf /etc/lvm/lvmlocal.conf.lab && "
          "printf 'devices {\\n\\tglobal_filter = [ \"a|^/dev/vdb$|\", \"r|.*|\" ]\\n}\\n' >>/etc/lvm/lvmlocal.conf")

OTHERS = {"primary": ["/dev/vg-prod/other-1", "/dev/vg-prod/other-1-snap"], "backup": ["/dev/vg-dr/app-log"]}


def _hashes(lab, paths):
    return {h: [sha(lab, h, p) for p in ps] for h, ps in paths.items()}


def _refused(lab, code, *args):
    r = rc(lab, *args, check=False)
    assert r.returncode == code, f"{args}: exit {r.returncode}, wanted {code}: {r.stderr}"
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip()


def test_create_secondaries_on_hyphenated_names_in_a_shared_pool(clean_lab):
    lab = clean_lab
    lab.run("primary", DEVICES_FILE)
    lab.run("backup", FILTER)
    run_guest(lab, PRIMARY, "primary")
    listed = lab.run("primary", "lvm lvmdevices").stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [["Device", "/dev/vdb"]], listed   # pvcreate listed its PV
    assert "global_filter" in lab.run("backup", "lvmconfig devices/global_filter").stdout
    free = run_guest(lab, BACKUP, "backup")["free"]
    assert 32 << 20 < free < 96 << 20, free           # room for app-log's copy, not for app-big's
    lab.run("primary", "lvchange -qq -ay -K vg-prod/other-1-snap")
    before = _hashes(lab, OTHERS)
    rc(lab, "target", "create", "backup", "--link", "backup")
    rc(lab, "target", "create", "primary", "--link", "primary", host="backup")
    rc(lab, "group", "create", "g", "--target", "backup")

    # Refusals first: nothing may be created by them.
    lvs0 = lab.run("backup", "lvs --noheadings -o lv_name vg-dr").stdout.split()
    why = _refused(lab, 16, "group", "admit", "g", "/dev/vg-prod/app-db", "backup", "--create", "vg-dr/pool-small")
    assert "pool-small" in why and "MiB" in why, why
    why = _refused(lab, 16, "group", "admit", "g", "/dev/vg-prod/app-big", "backup", "--create", "vg-dr")
    assert "vg-dr" in why and "96 MiB" in why, why
    why = _refused(lab, 4, "group", "admit", "g", "/dev/vg-prod/app-log", "backup", "--create", "vg-dr")
    assert "vg-dr/app-log already exists" in why, why
    _refused(lab, 3, "group", "admit", "g", "/dev/vg-prod/app-log", "backup", "--create", "vg-nope")
    _refused(lab, 2, "group", "admit", "g", "/dev/vg-prod/app-log", "backup:/dev/other/x", "--create", "vg-dr")
    assert lab.run("backup", "lvs --noheadings -o lv_name vg-dr").stdout.split() == lvs0
    assert status(lab)["volumes"] == []

    # The secondaries rcopy makes: thin app-db in pool-b (the primary's name), thick app-log-copy.
    rc(lab, "group", "admit", "g", "/dev/vg-prod/app-db", "backup", "--create", "vg-dr/pool-b")
    rc(lab, "group", "admit", "g", "/dev/vg-prod/app-log", "backup:app-log-copy", "--create", "vg-dr")
    rows = {r.split()[0]: r.split()[1:] for r in lab.run(
        "backup", "lvs --noheadings --units b --nosuffix -o lv_name,lv_size,pool_lv vg-dr").stdout.splitlines()}
    assert rows["app-db"] == [str(32 << 20), "pool-b"] and rows["app-log-copy"] == [str(32 << 20)], rows
    rc(lab, "group", "start", "g", "--wait")
    run_guest(lab, 'write_blocks("/dev/vg-prod/app-db", {i: bytes([i % 251 + 1]) * BLOCK for i in range(3, 900, 7)})\n'
                   'write_blocks("/dev/vg-prod/app-log", {i: bytes([i % 13 + 1]) * BLOCK for i in range(1, 8000, 97)})')
    rc(lab, "sync", "g", "--wait")
    rc(lab, "verify", "g")
    for prim, sec in (("app-db", "app-db"), ("app-log", "app-log-copy")):
        assert sha(lab, "backup", f"/dev/vg-dr/{sec}") == sha(lab, "primary", f"/dev/vg-prod/rcopy.g.{prim}.P2"), prim
    assert _hashes(lab, OTHERS) == before
    assert lab.run("primary", "dmsetup info -c --noheadings -o name,suspended").stdout.count("Suspended") == 0

    # The daemon's device watch. Its tick is 10 minutes, so only the udev event can wake it in time.
    lab.run("primary", "nohup rcopy daemon --tick 600 >/tmp/daemon.log 2>&1 & echo $! >/tmp/daemon.pid")
    time.sleep(3)                                          # its first loop (and the udev monitor) are up
    lab.run("primary", "dmsetup remove vg--prod-app--db")
    for _ in range(120):
        g = status(lab)
        if g["state"] == "stopped":
            break
        time.sleep(0.5)
    log = lab.run("primary", "kill $(cat /tmp/daemon.pid); sleep 1; cat /tmp/daemon.log").stdout
    assert g["state"] == "stopped", (g, log[-800:])
    assert g["reason"] == ("device /dev/vg-prod/app-db of volume app-db is gone (removed or deactivated): bring it "
                           "back as admitted, then 'rcopy group start g'"), g["reason"]
    assert "ALERT device g/app-db" in log and "no udev events" not in log, log[-800:]
    alerts = json.loads(rc(lab, "status", "alerts", "--json").stdout)["alerts"]
    assert [(a["kind"], a["object"]) for a in alerts] == [("device", "g/app-db")], alerts
    why = _refused(lab, 13, "group", "start", "g")         # still gone: refused before anything is cut
    assert why.endswith("is gone (removed or deactivated): bring it back as admitted, then 'rcopy group start g'")
    lab.run("primary", "lvchange -qq -ay vg-prod/app-db")
    rc(lab, "group", "start", "g", "--wait")
    assert status(lab)["state"] == "started" and json.loads(rc(lab, "status", "alerts", "--json").stdout)["alerts"] == []
    rc(lab, "verify", "g")
