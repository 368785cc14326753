"""The lab itself, on a real kernel: what issue 2 says it must show before anything is built on it.

Each test runs a shell script in a VM (one ssh round trip; every exec costs ~0.5 s under TCG) that
prints ``key=value`` lines, and asserts on those here. Hashes are sha256 of whole regions.
"""
import subprocess

import pytest

from lab.config import REPO

pytestmark = pytest.mark.lab

MIB = 1 << 20


def facts(lab, host, script, **kw):
    """Run a bash script in host (fail on its first error); its key=value output lines as a dict."""
    out = lab.run(host, "bash -euo pipefail -s", input=script, **kw).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# Origin and snapshot each get: A written before the snapshot, B over A and C further on after it.
SNAPSHOT_SCRIPT = r"""
head -c 1M /dev/urandom >/tmp/A; head -c 1M /dev/urandom >/tmp/B; head -c 1M /dev/urandom >/tmp/C
h() { sha256sum | cut -d' ' -f1; }
region() { dd if="$1" bs=1M skip="$2" count=1 iflag=direct status=none | h; }
put() { dd if="$1" of="$2" bs=1M seek="$3" oflag=direct conv=fsync status=none; }
echo "A=$(h </tmp/A)"; echo "B=$(h </tmp/B)"; echo "C=$(h </tmp/C)"; echo "ZERO=$(head -c 1M /dev/zero | h)"
vgcreate -q smoke /dev/vdb >/dev/null
lvcreate -q -L 96m -T smoke/pool >/dev/null
lvcreate -q -V 64m -T smoke/pool -n thin >/dev/null
lvcreate -q -L 32m -n thick smoke >/dev/null
for lv in thin thick; do put /tmp/A /dev/smoke/$lv 0; done
lvcreate -q -s -n thin_snap smoke/thin >/dev/null             # thin snapshot: shares the pool
lvchange -q -ay -K smoke/thin_snap
lvcreate -q -s -L 16m -n thick_snap smoke/thick >/dev/null    # dm-snapshot with its own COW store
for lv in thin thick; do put /tmp/B /dev/smoke/$lv 0; put /tmp/C /dev/smoke/$lv 4; done
for lv in thin thick thin_snap thick_snap; do
  echo "$lv.0=$(region /dev/smoke/$lv 0)"; echo "$lv.4=$(region /dev/smoke/$lv 4)"
done
echo "targets=$(dmsetup table | awk '{print $4}' | sort -u | tr '\n' ,)"
"""


def test_thin_and_thick_snapshots_keep_the_data_of_their_instant(clean_lab):
    f = facts(clean_lab, "primary", SNAPSHOT_SCRIPT)
    for kind in ("thin", "thick"):
        assert (f[f"{kind}.0"], f[f"{kind}.4"]) == (f["B"], f["C"]), f"{kind} origin lost writes made after the snapshot"
        assert (f[f"{kind}_snap.0"], f[f"{kind}_snap.4"]) == (f["A"], f["ZERO"]), f"{kind} snapshot changed with its origin"
    targets = set(f["targets"].strip(",").split(","))
    assert {"thin-pool", "thin", "snapshot-origin", "snapshot"} <= targets


EXPORT_SCRIPT = r"""
vgcreate -q smoke /dev/vdb >/dev/null
lvcreate -q -L 32m -n sec smoke >/dev/null
nbdkit -i 169.254.77.2 -p 10809 -P /run/smoke-nbdkit.pid file /dev/smoke/sec
"""
# -timeout: the kernel fails a request unanswered this long (and the connection with it) instead of waiting.
CONNECT = "nbd-client backup 10809 {dev} -b 4096 -timeout 5 >/dev/null 2>&1"
WRITE_SCRIPT = r"""
head -c {size} /dev/urandom >/tmp/data
connect() {{ """ + CONNECT + r""" ; }}
connect
dd if=/tmp/data of={dev} bs=1M oflag=direct conv=fsync status=none
nbd-client -d {dev} >/dev/null 2>&1
echo "sent=$(sha256sum </tmp/data | cut -d' ' -f1)"
"""
READ_BACK = "echo \"held=$(head -c {size} /dev/smoke/sec | sha256sum | cut -d' ' -f1)\""


def _send(lab, dev, size):
    """Write size random bytes from primary to backup's export through kernel NBD; (sent, held) hashes."""
    sent = facts(lab, "primary", WRITE_SCRIPT.format(dev=dev, size=size), timeout=180)["sent"]
    held = facts(lab, "backup", "echo 3 >/proc/sys/vm/drop_caches\n" + READ_BACK.format(size=size))["held"]
    return sent, held


def test_nbd_writes_from_primary_land_on_the_backup_lv(clean_lab):
    facts(clean_lab, "backup", EXPORT_SCRIPT)
    sent, held = _send(clean_lab, "/dev/nbd0", 8 * MIB)
    assert sent == held


def test_link_down_fails_nbd_io_and_link_up_allows_a_new_connection(clean_lab):
    lab = clean_lab
    facts(lab, "backup", EXPORT_SCRIPT)
    lab.run("primary", CONNECT.format(dev="/dev/nbd0"))
    lab.link(False)
    # Generous timeout = "hung": with -timeout 5 the kernel must fail the write long before.
    cut = lab.run("primary", "dd if=/dev/urandom of=/dev/nbd0 bs=64k count=16 oflag=direct conv=fsync status=none",
                  check=False, timeout=240)
    assert cut.returncode != 0, "a write over NBD succeeded with the link down"
    lab.run("primary", "nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true", timeout=120)
    lab.link(True)
    sent, held = _send(lab, "/dev/nbd1", 2 * MIB)
    assert sent == held


CRASH_SETUP = r"""
vgcreate -q smoke /dev/vdb >/dev/null
lvcreate -q -L 64m -T smoke/pool >/dev/null
lvcreate -q -V 32m -T smoke/pool -n thin >/dev/null
lvcreate -q -L 16m -n thick smoke >/dev/null
for lv in thin thick; do
  head -c 4M /dev/urandom | dd of=/dev/smoke/$lv bs=1M oflag=direct conv=fsync status=none
done
sync
"""
STATE = r"""
echo "boot=$(cat /proc/sys/kernel/random/boot_id)"
echo "lvs=$(lvs --noheadings -o lv_name,lv_active smoke | tr -s ' ' | tr '\n' ,)"
for lv in thin thick; do echo "$lv=$(head -c 4M /dev/smoke/$lv | sha256sum | cut -d' ' -f1)"; done
"""


def test_crash_and_start_keep_the_backups_lvs_and_their_data(clean_lab):
    lab = clean_lab
    facts(lab, "backup", CRASH_SETUP)
    before = facts(lab, "backup", STATE)
    lab.crash("backup")
    assert not lab.vm("backup").alive()
    lab.start("backup")
    after = facts(lab, "backup", STATE)
    assert after["boot"] != before["boot"], "backup did not reboot"
    assert after["lvs"] == before["lvs"]
    assert "thin active" in after["lvs"] and "thick active" in after["lvs"]
    assert (after["thin"], after["thick"]) == (before["thin"], before["thick"])


def test_vms_reach_each_other_by_name_and_run_the_working_trees_rcopy(clean_lab):
    import rcopy
    for host, other in (("primary", "backup"), ("backup", "primary")):
        f = facts(clean_lab, host, f"echo \"peer=$(ssh {other} hostname)\"; echo \"version=$(rcopy --version)\"")
        assert f["peer"] == other
        assert f["version"] == f"rcopy {rcopy.__version__}"


def test_scripts_lab_run_exits_with_the_commands_status(lab):
    cp = subprocess.run([REPO / "scripts/lab", "run", "backup", "--", "sh", "-c", "echo out; exit 3"],
                        capture_output=True, text=True, timeout=120)
    assert (cp.returncode, cp.stdout) == (3, "out\n")
