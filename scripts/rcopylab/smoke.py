"""The lab smoke scenario of issue 2: what the lab must show on a real kernel before rcopy builds on it.

One scenario, two faces: tests/lab/test_lab_smoke.py asserts each step, scripts/demo narrates it. Each
step runs one bash script per VM (every exec costs ~0.5 s under TCG, so few round trips) that prints
``key=value`` lines, and returns a :class:`Shown`: the claim, whether the facts bear it out, the facts.
Hashes are sha256 of whole regions.
"""
from __future__ import annotations

import dataclasses

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Shown:
    claim: str
    ok: bool
    facts: dict

    def __str__(self) -> str:
        return f"{'SHOWN' if self.ok else 'NOT SHOWN'}: {self.claim}" + ("" if self.ok else f"\n  facts: {self.facts}")


def facts(lab, host, script, **kw) -> dict:
    """Run a bash script in host (stop at its first error); its key=value output lines as a dict."""
    out = lab.run(host, "bash -euo pipefail -s", input=script, **kw).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# Origin and snapshot each get: A written before the snapshot; B over A and C further on after it.
SNAPSHOTS = r"""
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
echo "targets=$(dmsetup table | awk '{print $4}' | sort -u | tr '\n' ' ')"
"""


def snapshots(lab) -> Shown:
    f = facts(lab, "primary", SNAPSHOTS)
    ok = all((f[f"{k}.0"], f[f"{k}.4"], f[f"{k}_snap.0"], f[f"{k}_snap.4"]) == (f["B"], f["C"], f["A"], f["ZERO"])
             for k in ("thin", "thick"))
    ok = ok and {"thin-pool", "thin", "snapshot-origin", "snapshot"} <= set(f["targets"].split())
    return Shown("in primary, a thin snapshot (dm thin-pool) and a thick snapshot (dm-snapshot) keep the data of "
                 "their instant while their origins take new writes", ok, f)


EXPORT = r"""
vgcreate -q smoke /dev/vdb >/dev/null
lvcreate -q -L 32m -n sec smoke >/dev/null
nbdkit -i 169.254.77.2 -p 10809 -P /run/smoke-nbdkit.pid file /dev/smoke/sec
"""
# -timeout: the kernel fails a request unanswered this long (and the connection with it) instead of waiting.
CONNECT = "nbd-client backup 10809 {dev} -b 4096 -timeout 5 >/dev/null 2>&1"
SEND = r"""
head -c {size} /dev/urandom >/tmp/data
""" + CONNECT + r"""
dd if=/tmp/data of={dev} bs=1M oflag=direct conv=fsync status=none
nbd-client -d {dev} >/dev/null 2>&1
echo "sent=$(sha256sum </tmp/data | cut -d' ' -f1)"
"""
HELD = "echo 3 >/proc/sys/vm/drop_caches; echo \"held=$(head -c {size} /dev/smoke/sec | sha256sum | cut -d' ' -f1)\""


def export(lab) -> None:
    """backup exports a fresh LV with nbdkit on its link address."""
    facts(lab, "backup", EXPORT)


def _send(lab, dev: str, size: int) -> dict:
    sent = facts(lab, "primary", SEND.format(dev=dev, size=size), timeout=180)
    return {**sent, **facts(lab, "backup", HELD.format(size=size))}


def nbd_write(lab) -> Shown:
    f = _send(lab, "/dev/nbd0", 8 * MIB)
    return Shown("8 MiB written in primary to kernel NBD reads back identical from the LV backup exports "
                 "with nbdkit over the link", f["sent"] == f["held"], f)


def link_cut(lab) -> Shown:
    lab.run("primary", CONNECT.format(dev="/dev/nbd0"))
    lab.link(False)
    # The generous timeout means "hung": with -timeout 5 the kernel must fail the write long before.
    cut = lab.run("primary", "dd if=/dev/urandom of=/dev/nbd0 bs=64k count=16 oflag=direct conv=fsync status=none",
                  check=False, timeout=240)
    lab.run("primary", "nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true", timeout=120)
    lab.link(True)
    f = {"write_while_down_rc": cut.returncode, "error": cut.stderr.strip()[-200:], **_send(lab, "/dev/nbd1", 2 * MIB)}
    return Shown("with the link down an NBD write fails (no hang), and after link up a new NBD connection "
                 "carries data intact", cut.returncode != 0 and f["sent"] == f["held"], f)


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


def crash_start(lab) -> Shown:
    facts(lab, "backup", CRASH_SETUP)
    before = facts(lab, "backup", STATE)
    lab.crash("backup")
    killed = not lab.vm("backup").alive()
    lab.start("backup")
    after = facts(lab, "backup", STATE)
    ok = killed and after["boot"] != before["boot"] and {k: after[k] for k in ("lvs", "thin", "thick")} == \
        {k: before[k] for k in ("lvs", "thin", "thick")} and "thin active" in after["lvs"]
    return Shown("after a power cut of backup and a fresh boot, its thin and thick LVs are active again "
                 "with the data flushed before the cut", ok, {"killed": killed, "before": before, "after": after})


def peers(lab, version: str) -> Shown:
    f = {}
    for host, other in (("primary", "backup"), ("backup", "primary")):
        got = facts(lab, host, f"echo \"peer=$(ssh {other} hostname)\"; echo \"version=$(rcopy --version)\"")
        f[host] = got
        f[f"{host}_ok"] = got == {"peer": other, "version": f"rcopy {version}"}
    return Shown(f"root in each VM reaches the other by name over the link, and runs the working tree's rcopy {version}",
                 f["primary_ok"] and f["backup_ok"], f)
