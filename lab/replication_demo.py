"""scripts/demo: rcopy replicating a group of a thin and a thick volume from `primary` to `backup`.

Boots (or reuses) the two-VM lab, then, as an admin would, through the CLI: targets on both systems, a
group (its mirror appears on the backup by itself), two volume pairs, the initial sync, three rounds of
random writes + `rcopy sync --wait`, `rcopy status`, `rcopy verify`, and a hash of every secondary
against the primary snapshot of the same sync point. Prints each command, its output, and at the end
what was proved. Exit 0 only if every claim held. RCOPY_LAB_KEEP=1 leaves the VMs running.
"""
from __future__ import annotations

import json
import os
import sys
import time

from lab.labctl import Lab
from rcopy.errors import RcopyError

VG, MIB, VOLS = "rcopytest", 64, ("thinvol", "thickvol")
SETUP = f"""set -e
pvcreate -qq -y -ff /dev/vdb >/dev/null
vgcreate -qq -s 1m {VG} /dev/vdb >/dev/null
lvcreate -qq -y -L 192m -T {VG}/pool --chunksize 64k -Zn >/dev/null
lvcreate -qq -y -V {MIB}m -T {VG}/pool -n thinvol >/dev/null
lvcreate -qq -y -Wy -Zy -L {MIB}m -n thickvol {VG} >/dev/null
"""
WRITE = """python3 - <<'PY'
import os, random
rnd = random.Random({seed})
for v in {vols!r}:
    fd = os.open("/dev/{vg}/" + v, os.O_WRONLY)
    for i in rnd.sample(range({mib} * 256), {blocks}):
        os.pwrite(fd, rnd.randbytes(4096), i * 4096)
    os.fsync(fd); os.close(fd)
PY"""


class Demo:
    def __init__(self, lab: Lab):
        self.lab, self.claims = lab, []

    def say(self, msg=""):
        print(msg, flush=True)

    def sh(self, host, cmd, show=True):
        if show:
            self.say(f"{host}# {cmd}")
        r = self.lab.run(host, cmd, check=False, timeout=900)
        if show and (r.stdout.strip() or r.stderr.strip()):
            self.say("\n".join("    " + l for l in (r.stdout + r.stderr).rstrip().splitlines()))
        if r.returncode:
            raise RuntimeError(f"{host}: {cmd} failed with exit {r.returncode}")
        return r.stdout

    def claim(self, text, ok):
        self.claims.append((text, bool(ok)))
        self.say(f"  -> {'PROVED' if ok else 'FAILED'}: {text}")

    def group(self):
        return json.loads(self.sh("primary", "rcopy status --json", show=False))["groups"][0]

    def hashes_match(self, gen):
        for v in VOLS:
            sec = self.sh("backup", f"sha256sum /dev/{VG}/{v}", show=False).split()[0]
            pri = self.sh("primary", f"sha256sum /dev/{VG}/rcopy.g.{v}.P{gen}", show=False).split()[0]
            if sec != pri:
                return False
        return True

    def run(self):
        for h in ("primary", "backup"):
            self.sh(h, "bash -s <<'EOF'\n" + SETUP + "EOF", show=False)
        self.say(f"demo: on both VMs: VG {VG} with a thin LV and a thick LV of {MIB} MiB each")
        self.sh("primary", f"dd if=/dev/urandom of=/dev/{VG}/thinvol bs=1M count=16 status=none; "
                           f"dd if=/dev/urandom of=/dev/{VG}/thickvol bs=1M count=16 status=none")
        self.sh("primary", "rcopy target create backup --link backup")
        self.sh("backup", "rcopy target create primary --link primary")
        self.sh("primary", "rcopy group create g --target backup --policy auto_recover,over_per_alert")
        mirror = json.loads(self.sh("backup", "rcopy status groups --json", show=False))["groups"]
        self.claim("the group appeared on the backup by itself, as secondary",
                   [(g["name"], g["role"]) for g in mirror] == [("g", "secondary")])
        for v in VOLS:
            self.sh("primary", f"rcopy group admit g /dev/{VG}/{v} backup:/dev/{VG}/{v}")
        self.sh("primary", "rcopy group start g --wait")
        g = self.group()
        self.claim("initial sync: zero runs travel as write-zeroes (32 MiB of data sent for 128 MiB of volumes)",
                   sum(v["bytes_sent"] for v in g["volumes"]) == 32 << 20)
        self.claim("every secondary equals the primary snapshot P1", self.hashes_match(1))
        for rnd in range(3):
            blocks = 50 * (rnd + 1)
            self.sh("primary", WRITE.format(seed=rnd, vols=list(VOLS), vg=VG, mib=MIB, blocks=blocks), show=False)
            self.say(f"demo: wrote {blocks} random 4 KiB blocks on each volume")
            self.sh("primary", "rcopy sync g --wait")
            g = self.group()
            gen = g["sync_point"]["generation"]
            sent = [v["bytes_sent"] for v in g["volumes"]]
            self.claim(f"sync point {gen} is a delta: {sent} bytes sent for {blocks * 4096} bytes written per "
                       f"volume, not {MIB} MiB", all(blocks * 4096 <= s <= 2 * blocks * 4096 for s in sent)
                       and all(not v["full_reason"] for v in g["volumes"]))
            self.claim(f"every secondary equals the primary snapshot P{gen} (sha256)", self.hashes_match(gen))
        self.sh("primary", "rcopy status")
        out = self.sh("primary", "rcopy verify g")
        self.claim("rcopy verify finds every secondary equal to the last sync point", "every secondary equals" in out)
        self.sh("backup", "rcopy status")
        self.sh("primary", "lvs -o lv_name,lv_attr,origin,pool_lv " + VG)


def main() -> int:
    lab = Lab(log=print)
    t0 = time.monotonic()
    demo = Demo(lab)
    try:
        print("demo: booting the two-VM lab (primary, backup) with the working tree's rcopy installed", flush=True)
        lab.ensure_up()
        lab.reset()
        demo.run()
    except (RcopyError, RuntimeError) as e:
        print(f"demo: stopped: {e}", flush=True)
        return 1
    finally:
        if not os.environ.get("RCOPY_LAB_KEEP"):
            lab.down()
    good = sum(ok for _, ok in demo.claims)
    print(f"\ndemo: {good} of {len(demo.claims)} claims proved in {time.monotonic() - t0:.0f} s:", flush=True)
    for text, ok in demo.claims:
        print(f"  {'yes' if ok else 'NO '}  {text}")
    return 0 if demo.claims and good == len(demo.claims) else 1


if __name__ == "__main__":
    sys.exit(main())
