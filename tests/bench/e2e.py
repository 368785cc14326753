"""Benchmark: one resync end to end, rcopy against rsync and against rcopy's own full copy (issue 15).

Runs in the lab, on its own instance (.lab-bench unless RCOPY_LAB_DIR says otherwise) whose data disks it
sizes for the run. On `primary`: a thin and a thick volume of --size MiB, filled with random data and
replicated by rcopy to `backup`; a second pair of secondaries on `backup` is kept equal by rsync over
ssh on the link (`rsync --inplace --no-whole-file --copy-devices --write-devices`, device nodes, not
the /dev/VG links rsync would skip). Then for each --pattern and --percent, the same blocks change on
both volumes and three copies run one after the other on that one change. `random`: 4 KiB blocks
anywhere, the worst case for a thin volume (the pool's metadata tracks 64 KiB chunks, the smallest
dm-thin allows, and 1 % of blocks at random touch ~15 % of them); `clustered`: as many blocks, written
as whole 64 KiB chunks (the metadata then marks exactly what changed):

    rcopy     `rcopy sync g --wait`          (only what changed, found from LVM metadata)
    rsync     rsync of both volumes           (reads both sides whole, sends what differs)
    full      `rcopy sync g --wait --full`    (rcopy's sequential whole-volume copy)

One JSON line per copy: wall seconds, bytes read from the primary's data disks (/sys/block/vd?/stat),
bytes on the link (the primary's link interface, both directions), external commands per side (rcopy's
own counter; rsync: one process a side), bytes changed, and whether every copy hash-equals its source.
Figures drift under TCG: compare the rows of one run, not runs with each other.

    scripts/bench e2e [--size MIB] [--percent 1,10,50] [--pattern random,clustered] [--seed N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
sys.path[:0] = [TOP, os.path.join(TOP, "scripts")]   # rcopy, tests.lab; rcopylab

VG, PVS = "bench", ("/dev/vdb", "/dev/vdc")
VOLS = ("bthin", "bthick")
RUNS = {"random": 1, "clustered": 16}      # 4 KiB blocks written together, aligned on their count

SETUP = """
sh("pvcreate", "-qq", "-y", "-ff", *{pvs!r})
sh("vgcreate", "-qq", "-s", "4m", {vg!r}, *{pvs!r})
sh("lvcreate", "-qq", "-y", "-L", "{pool}m", "-T", "{vg}/pool", "--chunksize", "64k", "-Zy")
sh("lvcreate", "-qq", "-y", "-V", "{mib}m", "-T", "{vg}/pool", "-n", "bthin")
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "{mib}m", "-n", "bthick", {vg!r})
for extra in {extra!r}:
    sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", "{mib}m", "-n", extra, {vg!r})
if {fill}:
    fill_random("/dev/{vg}/bthin", {mib}, seed=1)
    fill_random("/dev/{vg}/bthick", {mib}, seed=2)
OUT["dev"] = {{n: os.path.realpath(f"/dev/{vg}/" + n) for n in ("bthin", "bthick") + tuple({extra!r})}}
"""

CHANGE = """
import random
rnd = random.Random({seed})
n, run = {mib} * 256, {run}
count = max(1, n * {percent} // 100)
for v in ("bthin", "bthick"):
    # `run` blocks at a time, aligned on `run`: 1 (random 4 KiB blocks) or 16 (whole 64 KiB thin chunks)
    starts = rnd.sample(range(0, n, run), max(1, count // run))
    write_blocks("/dev/{vg}/" + v, {{s + i: rnd.randbytes(BLOCK) for s in starts for i in range(run)}})
OUT["blocks"] = max(1, count // run) * run
"""

COUNTERS = r"""
cat /sys/block/vdb/stat /sys/block/vdc/stat | awk '{s += $3} END {printf "%.0f ", s}'
ifc=$(ip -o -4 addr show to 169.254.77.0/24 | awk '{print $2; exit}')
echo $(( $(cat /sys/class/net/$ifc/statistics/rx_bytes) + $(cat /sys/class/net/$ifc/statistics/tx_bytes) ))
"""

# Cold data, warm programs: each method starts with the bench VG's devices out of the page cache (every
# dm device has its own), but not python, ssh, lvm or rsync themselves: dropping every cache made each
# row pay ~10 s of cold program loads from the emulated disk, which a periodic sync does not pay.
DROP = f"sync; for d in /dev/mapper/{VG}-*; do blockdev --flushbufs \"$d\"; done"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="MiB per volume (default 512)")
    ap.add_argument("--percent", default="1,10,50", help="percentages of 4 KiB blocks changed (default 1,10,50)")
    ap.add_argument("--pattern", default="random",
                    help="random (4 KiB blocks anywhere), clustered (whole 64 KiB chunks, the thin pool's "
                         "block), or both comma separated (default random)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    percents = [int(p) for p in args.percent.split(",") if p.strip()]
    patterns = [p.strip() for p in args.pattern.split(",") if p.strip()]
    if not patterns or any(p not in RUNS for p in patterns):
        ap.error(f"--pattern: one or more of {', '.join(RUNS)}")
    mib = args.size
    # A thin pool must hold its volume about twice and stay under rcopy's 80% guard: a full resync
    # rewrites every block while R (backup) keeps the old ones, and 10% of 4 KiB blocks changed at random
    # touch ~81% of the 64 KiB chunks, each copied away from P(n) (primary) or R(n) (backup). Measured:
    # a 1.25x pool ran out in the --full copy (EIO); a 2.25x pool hit the 80% guard at 10%.
    pool = mib * 3 + 64
    # primary: pool + thick + two P snapshots of the thick one (half its size each) ~5x; backup: pool,
    # thick, its R (the whole volume), rsync's pair ~7x; spread over the two data disks.
    need = (mib * 7 + 256) // 2
    os.environ.setdefault("RCOPY_LAB_DIR", os.path.join(TOP, ".lab-bench"))
    os.environ["RCOPY_LAB_DISK_MB"] = str(max(512, -(-need // 256) * 256))
    from rcopylab.labctl import Lab
    from tests.lab.dm_guest import run_guest

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    lab = Lab(log=say)
    disk = lab.vm("primary").disk("vdb")
    if lab.healthy() and disk.exists() and disk.stat().st_size < lab.cfg.disk_mb << 20:
        lab.down()                  # data disks too small for this size: boot afresh with bigger ones
    lab.ensure_up()
    lab.reset()

    def sh(host, cmd, timeout=3600):
        return lab.run(host, cmd, timeout=timeout).stdout

    def rc(*a, host="primary"):
        return sh(host, "rcopy " + " ".join(a))

    t0 = time.monotonic()
    dev_p = run_guest(lab, SETUP.format(pvs=PVS, vg=VG, pool=pool, mib=mib, extra=(), fill=True), "primary")["dev"]
    dev_b = run_guest(lab, SETUP.format(pvs=PVS, vg=VG, pool=pool, mib=mib, extra=("rthin", "rthick"), fill=False),
                      "backup")["dev"]
    rc("target", "create", "backup", "--link", "backup")
    rc("target", "create", "primary", "--link", "primary", host="backup")
    rc("group", "create", "g", "--target", "backup")
    for v in VOLS:
        rc("group", "admit", "g", f"/dev/{VG}/{v}", f"backup:/dev/{VG}/{v}")
    rc("group", "start", "g", "--wait")
    rsync = [f"rsync --inplace --no-whole-file --copy-devices --write-devices -e 'ssh -T' "
             f"{dev_p[v]} backup:{dev_b['r' + v[1:]]}" for v in VOLS]
    for cmd in rsync:
        sh("primary", cmd)                       # the rsync pair starts equal too (not measured)
    say(f"e2e: set up and initial copies in {time.monotonic() - t0:.0f} s")

    def counters():
        sectors, link = sh("primary", COUNTERS).split()     # mawk's %d stops at 2^31: sectors, not bytes
        return int(sectors) * 512, int(link)

    def measure(method, percent, pattern, blocks, run):
        sh("primary", DROP)
        sh("backup", DROP)
        r0, l0 = counters()
        t = time.monotonic()
        extra = run() or {}
        wall = time.monotonic() - t
        r1, l1 = counters()
        src = {v: sh("primary", f"sha256sum {dev_p[v]}").split()[0] for v in VOLS}
        dst = {v: sh("backup", f"sha256sum {dev_b[('r' + v[1:]) if method == 'rsync' else v]}").split()[0] for v in VOLS}
        row = {"bench": "e2e", "method": method, "percent": percent, "pattern": pattern, "volume_mib": mib,
               "bytes_changed": 2 * blocks * 4096, "seconds": round(wall, 2), "primary_bytes_read": r1 - r0,
               "link_bytes": l1 - l0, "equal": src == dst, **extra}
        print(json.dumps(row), flush=True)
        return row

    def rcopy_sync(*flags):
        def go():
            rc("sync", "g", "--wait", *flags)
            rep = json.loads(rc("status", "--json"))["groups"][0]["last_sync"]
            return {"bytes_sent": rep.get("bytes_sent"), "commands_primary": rep.get("commands"),
                    "commands_backup": rep.get("peer_commands"), "phases": rep.get("phases"),
                    "sync_seconds": rep.get("seconds"), "setup_seconds": rep.get("setup_seconds")}
        return go

    def rsync_both():
        for cmd in rsync:
            sh("primary", cmd)
        return {"commands_primary": 1, "commands_backup": 1}

    rows = []
    for pat in patterns:
        for p in percents:
            change = CHANGE.format(seed=args.seed + p, mib=mib, percent=p, vg=VG, run=RUNS[pat])
            blocks = run_guest(lab, change, "primary")["blocks"]
            rows.append(measure("rcopy", p, pat, blocks, rcopy_sync()))
            rows.append(measure("rsync", p, pat, blocks, rsync_both))
            rows.append(measure("full", p, pat, blocks, rcopy_sync("--full")))
    say(f"{'percent':>7} {'pattern':>9} {'method':>6} {'seconds':>8} {'read MiB':>9} {'link MiB':>9} {'cmds P/B':>9} equal")
    for r in rows:
        say(f"{r['percent']:>7} {r['pattern']:>9} {r['method']:>6} {r['seconds']:>8} {r['primary_bytes_read'] / 2**20:>9.1f} "
            f"{r['link_bytes'] / 2**20:>9.1f} {str(r.get('commands_primary')) + '/' + str(r.get('commands_backup')):>9} "
            f"{r['equal']}")
    if not os.environ.get("RCOPY_LAB_KEEP"):
        lab.down()
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
