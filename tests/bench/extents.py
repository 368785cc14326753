"""Benchmark: changed-block detection by metadata (thin_delta / COW table, then refine) vs the full
compare, for a thin and a thick volume with 1% of 4 KiB blocks changed. Runs in the lab (primary VM):
boots it if needed, installs the working tree, resets the data disks. Prints one JSON object per
line: seconds and bytes read from the data disk by each path, and their ratios (goal: metadata <=
1/20 of the full compare). Not a test: figures drift under TCG; compare the ratios.

    scripts/bench extents [--mib N] [--percent P]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
sys.path[:0] = [TOP, os.path.join(TOP, "scripts")]   # rcopy, tests.lab; rcopylab

from rcopylab.labctl import Lab  # noqa: E402
from tests.lab.dm_guest import run_guest  # noqa: E402

SNIPPET = """
import random, time
from rcopy.backends import for_device
from rcopy.changes.refine import full_compare
KIND, MIB, PERCENT = {kind!r}, {mib}, {percent}
v = thin_volume("benchthin", MIB, pool_mib=MIB * 5 // 4 + 64) if KIND == "thin" else thick_volume("benchcow", MIB)
fill_random(v, MIB, seed=11)
bk = for_device(v)
s = bk.snapshotter
(p1,) = s.cut([(v, f"rcopy.b.{{KIND}}.P1")])
rnd = random.Random(13)
n = MIB * 256
picked = rnd.sample(range(n), max(1, int(n * PERCENT / 100)))
write_blocks(v, {{i: rnd.randbytes(BLOCK) for i in picked}})
(p2,) = s.cut([(v, f"rcopy.b.{{KIND}}.P2")])
devs = data_devices(KIND, "bench" + KIND, [p1.name, p2.name])
def flush():
    # drop the data disk's cached pages only: a global drop_caches also evicts the lvm binaries and
    # Python modules from the root disk, which the first path measured would then pay for alone
    for d in ["/dev/vdb"] + ["/dev/mapper/" + n for n in devs]:
        sh("blockdev", "--flushbufs", d)
def measure(fn):
    flush()
    r0, d0, t0 = sectors_read(), dm_sectors_read(devs), time.monotonic()
    ext = list(fn())
    return ext, time.monotonic() - t0, (sectors_read() - r0) * 512, (dm_sectors_read(devs) - d0) * 512
measure(lambda: bk.changes.changed(p1, p2))        # warm-up: imports, tool binaries
meta_ext, meta_s, meta_b, meta_d = measure(lambda: bk.changes.changed(p1, p2))
full_ext, full_s, full_b, full_d = measure(lambda: full_compare(p1.path, p2.path))
OUT.update(bench="extents", backend=KIND, volume_mib=MIB, changed_blocks=len(picked),
           same_result=meta_ext == full_ext, changed_bytes=sum(e.length for e in meta_ext),
           metadata_seconds=round(meta_s, 3), metadata_bytes_read=meta_b,
           metadata_data_bytes_read=meta_d, full_seconds=round(full_s, 3), full_bytes_read=full_b,
           full_data_bytes_read=full_d,
           seconds_ratio=round(meta_s / full_s, 4), bytes_ratio=round(meta_b / full_b, 4),
           goal_met=meta_s <= full_s / 20 and meta_b <= full_b / 20)
for x in (p1, p2):
    s.delete(x)
sh("lvremove", "-qq", "-f", f"{{VG}}/bench{{KIND}}")
if KIND == "thin":
    sh("lvremove", "-qq", "-f", f"{{VG}}/pool")    # room for the thick volume and its COW store
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench extents", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128,
                   help="volume size in MiB (default 128; needs a lab disk of ~3x that: RCOPY_LAB_DISK_MB)")
    p.add_argument("--percent", type=float, default=1.0, help="share of 4 KiB blocks changed (default 1)")
    args = p.parse_args(argv)
    lab = Lab(log=lambda m: print(m, file=sys.stderr, flush=True))
    lab.up()
    lab.reset()
    for kind in ("thin", "cow"):
        out = run_guest(lab, SNIPPET.format(kind=kind, mib=args.mib, percent=args.percent), timeout=3600)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
