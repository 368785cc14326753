"""Guest-side helpers for the device-mapper lab tests: this file's text runs inside a lab VM.

``guest(lab, host, snippet)`` sends this module plus a snippet to ``python3 -`` in the VM, where rcopy
is installed (scripts/lab push), and returns what the snippet put in ``OUT`` (JSON on the last line).
The helpers build throw-away volumes on the data disk /dev/vdb (the lab's reset wipes it per test).
"""
import json
import mmap
import os
import random
import subprocess
import sys

VG = "rcopytest"
PV = "/dev/vdb"
DATA_DISK = "vdb"
BLOCK = 4096
OUT = {}


def sh(*argv, check=True):
    cp = subprocess.run(argv, capture_output=True, text=True)
    if check and cp.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp.stdout


def vg():
    if subprocess.run(["vgs", VG], capture_output=True).returncode:
        sh("pvcreate", "-qq", "-y", "-ff", PV)
        sh("vgcreate", "-qq", "-s", "1m", VG, PV)
    return VG


def thin_volume(name, mib, pool_mib=192):
    vg()
    if subprocess.run(["lvs", f"{VG}/pool"], capture_output=True).returncode:
        sh("lvcreate", "-qq", "-y", "-L", f"{pool_mib}m", "-T", f"{VG}/pool", "--chunksize", "64k", "-Zn")
    sh("lvcreate", "-qq", "-y", "-V", f"{mib}m", "-T", f"{VG}/pool", "-n", name)
    return f"/dev/{VG}/{name}"


def thick_volume(name, mib):
    vg()
    sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", f"{mib}m", "-n", name, VG)
    return f"/dev/{VG}/{name}"


def volume(kind, name, mib):
    return thin_volume(name, mib) if kind == "thin" else thick_volume(name, mib)


def _aligned(data):
    buf = mmap.mmap(-1, max(len(data), BLOCK))
    buf.write(data)
    return buf


def write_blocks(path, blocks):
    """Write {block index: bytes} with O_DIRECT (straight to the device), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for i, data in sorted(blocks.items()):
            buf = _aligned(data)
            os.pwritev(fd, [buf], i * BLOCK)
            buf.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_random(path, mib, seed):
    """Fill the volume with seeded random data (no zero block), in 1 MiB writes."""
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for m in range(mib):
            buf = _aligned(rnd.randbytes(1 << 20))
            os.pwritev(fd, [buf], m << 20)
            buf.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def change_blocks(path, mib, seed=7):
    """Write 60 random blocks of the volume: 40 with new data, 10 again with the data they hold (no
    change), 10 with zeroes. Returns the three sorted index lists."""
    rnd = random.Random(seed)
    idx = rnd.sample(range(mib * 256), 60)
    changed, same, zeroed = sorted(idx[:40]), sorted(idx[40:50]), sorted(idx[50:])
    blocks = {i: rnd.randbytes(BLOCK) for i in changed}
    blocks.update({i: read_block(path, i) for i in same})
    blocks.update({i: bytes(BLOCK) for i in zeroed})
    write_blocks(path, blocks)
    return changed, same, zeroed


def read_block(path, i):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BLOCK)
        os.preadv(fd, [buf], i * BLOCK)
        return bytes(buf)
    finally:
        os.close(fd)


def sha256(path):
    return sh("sha256sum", path).split()[0]


def sectors_read(disk=DATA_DISK):
    """Sectors read from the data disk since boot (/sys/block/DISK/stat, field 3)."""
    with open(f"/sys/block/{disk}/stat") as f:
        return int(f.read().split()[2])


def data_devices(kind, origin_lv, snap_names):
    """The dm devices that hold a volume's data blocks: the pool's tdata (thin), or the origin's -real
    device and the snapshots' -cow stores (dm-snapshot). Their read counters show which data was read."""
    if kind == "thin":
        return [f"{VG}-pool_tdata"]
    return [f"{VG}-{origin_lv}-real"] + [f"{VG}-{n}-cow" for n in snap_names]


def dm_sectors_read(names):
    return sum(sectors_read(os.path.basename(os.path.realpath(f"/dev/mapper/{n}"))) for n in names)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def snap(origin, name):
    from rcopy.ports import Snapshot
    from rcopy.sys import lvm
    lv = lvm.by_path(origin)
    return Snapshot(origin, name, f"/dev/{lv.vg}/{name}", "thin" if lv.is_thin else "cow")


def extents_json(extents):
    return [[e.offset, e.length, e.zero] for e in extents]


def done():
    print(json.dumps(OUT))
    sys.stdout.flush()


# --- host side ---------------------------------------------------------------------------------------
def run_guest(lab, snippet, host="primary", timeout=900):
    """Run this module + ``snippet`` in the VM; return the OUT dict it printed."""
    with open(__file__) as f:
        prelude = f.read().split("# --- host side")[0]
    res = lab.run(host, "python3 -", input=prelude + "\n" + snippet + "\ndone()\n", check=False, timeout=timeout)
    if res.returncode:
        raise AssertionError(f"guest snippet failed in {host} (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
