"""Changed-block detection on real device-mapper (issue 5): exact refined extents from thin_delta and
from the dm-snapshot COW table, with the data disk's read counters proving the metadata path reads
no data block of unchanged regions."""
import pytest

from rcopy.extent import Extent, coalesce
from tests.lab.dm_guest import run_guest

pytestmark = pytest.mark.lab

MIB = 32
EXACT = """
from rcopy import backends
from rcopy.changes import thin as thin_changes, cow as cow_changes
from rcopy.sys import lvm
KIND, MIB = {kind!r}, {mib}
v = volume(KIND, "vol", MIB)
fill_random(v, MIB, seed=1)
bk = backends.for_device(v)
s = bk.snapshotter
(p1,) = s.cut([(v, "rcopy.t.vol.P1")])
changed, same, zeroed = change_blocks(v, MIB)
(p2,) = s.cut([(v, "rcopy.t.vol.P2")])
src = bk.changes
devs = data_devices(KIND, "vol", [p1.name, p2.name])
drop_caches()
r0, d0 = sectors_read(), dm_sectors_read(devs)
ext = list(src.changed(p1, p2))
r1, d1 = sectors_read(), dm_sectors_read(devs)
a, b = lvm.by_path(p1.path), lvm.by_path(p2.path)
if KIND == "thin":
    cand = thin_changes.candidates(a, b)
    meta = 0                                   # thin metadata lives on tmeta, not tdata
else:
    cand = cow_changes.candidates(a)
    meta = 2 * 4096 + (len(cand) // 256 + 1) * 4096        # COW header + metadata areas (4 KiB chunks)
OUT.update(backend=s.backend, changed=changed, same=same, zeroed=zeroed, extents=extents_json(ext),
           disk_read_bytes=(r1 - r0) * 512, data_read_bytes=(d1 - d0) * 512,
           candidate_bytes=sum(c.length for c in cand), meta_bytes=meta, volume_bytes=MIB << 20)
"""


def expected(changed, zeroed):
    blocks = sorted([Extent(i * 4096, 4096) for i in changed] + [Extent(i * 4096, 4096, True) for i in zeroed])
    return [[e.offset, e.length, e.zero] for e in coalesce(blocks)]


@pytest.mark.parametrize("kind", ["thin", "cow"])
def test_refined_extents_are_exactly_the_changed_blocks(clean_lab, kind):
    out = run_guest(clean_lab, EXACT.format(kind=kind, mib=MIB))
    assert out["backend"] == kind
    # a rewrite with identical data is not a change; a zeroed block is a zero extent
    assert out["extents"] == expected(out["changed"], out["zeroed"])
    # the metadata path reads the candidates (old + new) and metadata, never unchanged data regions:
    # counted on the dm devices that hold the data (thin: pool tdata; cow: origin -real + COW stores)
    assert 0 < out["data_read_bytes"] <= 2 * out["candidate_bytes"] + out["meta_bytes"]
    assert out["candidate_bytes"] < out["volume_bytes"] // 8
    # the whole data disk (LVM's label scans and pool metadata included) reads far less than a full compare
    assert out["disk_read_bytes"] < 2 * out["volume_bytes"] // 8


REMOTE = """
import subprocess
from rcopy import backends
from rcopy.changes import digest, thin as thin_changes
from rcopy.sys import lvm
MIB = {mib}
v = volume("thin", "vol", MIB)
fill_random(v, MIB, seed=1)
bk = backends.for_device(v)
(p1,) = bk.snapshotter.cut([(v, "rcopy.t.vol.P1")])
bak = thick_volume("bak", MIB)                 # what the backup holds: sync point 1, on another device
subprocess.run(["dd", f"if={{p1.path}}", f"of={{bak}}", "bs=1M", "oflag=direct", "status=none"], check=True)
changed, same, zeroed = change_blocks(v, MIB)
(p2,) = bk.snapshotter.cut([(v, "rcopy.t.vol.P2")])
asked = []
def remote(spans):
    asked.append(sum(e - s for s, e in spans))
    return lambda: digest.digests_of(bak, [list(s) for s in spans])
devs = data_devices("thin", "vol", [])
drop_caches()
d0 = dm_sectors_read(devs)
ext = list(bk.changes.changed(p1, p2, remote=remote))
d1 = dm_sectors_read(devs)
cand = thin_changes.candidates(lvm.by_path(p1.path), lvm.by_path(p2.path))
OUT.update(changed=changed, zeroed=zeroed, extents=extents_json(ext), data_read_bytes=(d1 - d0) * 512,
           candidate_bytes=sum(c.length for c in cand), asked_bytes=sum(asked))
"""


def test_a_thin_refine_against_the_backups_digests_reads_only_the_new_snapshot(clean_lab):
    """rcopy.changes.digest on real dm-thin: the same exact extents as the local refine, while the
    pool's data device reads each candidate chunk once (the new side) instead of twice."""
    out = run_guest(clean_lab, REMOTE.format(mib=MIB))
    assert out["extents"] == expected(out["changed"], out["zeroed"])
    assert out["asked_bytes"] == out["candidate_bytes"] > 0
    assert 0 < out["data_read_bytes"] <= out["candidate_bytes"]


CUT = """
import subprocess, sys, time
from rcopy.backends import for_device
KIND = {kind!r}
A, B = volume(KIND, "a", 8), volume(KIND, "b", 8)
WRITER = '''
import mmap, os, struct, sys, time
fa, fb = (os.open(p, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) for p in sys.argv[1:3])
buf = mmap.mmap(-1, 4096)
n, errors = 0, 0
while not os.path.exists("/tmp/stop-writer"):
    n += 1
    for fd in (fa, fb):      # A first, then B: B never holds a number A does not
        buf.seek(0); buf.write(struct.pack("<Q", n))
        try:
            os.pwritev(fd, [buf], 0)
        except OSError:
            errors += 1
    time.sleep(0.01)         # between pairs: the 1-vCPU guest still runs the cuts beside it
print(n, errors)
'''
w = subprocess.Popen([sys.executable, "-c", WRITER, A, B], stdout=subprocess.PIPE, text=True)
s = for_device(A).snapshotter
pairs = []
try:
    for k in range(6):
        time.sleep(0.5)
        sa, sb = s.cut([(A, f"rcopy.c.a.P{{k}}"), (B, f"rcopy.c.b.P{{k}}")])
        va, vb = (int.from_bytes(read_block(p.path, 0)[:8], "little") for p in (sa, sb))
        pairs.append([va, vb])
finally:
    open("/tmp/stop-writer", "w").close()
    last, errors = map(int, w.communicate(timeout=60)[0].split())
OUT.update(pairs=pairs, last=last, errors=errors)
"""


@pytest.mark.parametrize("kind", ["thin", "cow"])
def test_group_cut_is_crash_consistent(clean_lab, kind):
    out = run_guest(clean_lab, CUT.format(kind=kind))
    assert out["errors"] == 0, "the cut must delay writes, never fail them"
    pairs = out["pairs"]
    assert all(b <= a <= b + 1 for a, b in pairs), pairs
    firsts = [a for a, _ in pairs]
    assert firsts == sorted(firsts) and firsts[0] < firsts[-1] <= out["last"], "writer ran through the cuts"


ROLLBACK = """
import random
from rcopy.backends import for_device
KIND = {kind!r}
v = volume(KIND, "vol", 16)
fill_random(v, 16, seed=3)
s = for_device(v).snapshotter
(p,) = s.cut([(v, "rcopy.r.vol.R1")])
before = sha256(v)
rnd = random.Random(9)
write_blocks(v, {{i: rnd.randbytes(BLOCK) for i in rnd.sample(range(16 * 256), 50)}})
changed = sha256(v)
s.rollback(p)
s.rollback(p)                         # idempotent: a consumed snapshot is a no-op
OUT.update(before=before, changed=changed, after=sha256(v), gone=s.find(v, p.name) is None,
           path_ok=os.path.exists(v))
"""


@pytest.mark.parametrize("kind", ["thin", "cow"])
def test_rollback_restores_the_snapshot_exactly(clean_lab, kind):
    out = run_guest(clean_lab, ROLLBACK.format(kind=kind))
    assert out["changed"] != out["before"]
    assert out["after"] == out["before"]
    assert out["gone"] and out["path_ok"]


OVERFLOW = """
from rcopy.snapshot.cow import CowSnapshotter
from rcopy.changes.cow import CowChanges, SnapshotInvalid
from rcopy.sys import lvm
v = thick_volume("vol", 16)
s = CowSnapshotter(cow_ratio=0.05)          # 1 MiB of COW for 16 MiB of origin
(p1,) = s.cut([(v, "rcopy.o.vol.P1")])
valid_before = s.valid(p1)
fill_random(v, 16, seed=5)                  # overwrite everything: overflows P1
(p2,) = s.cut([(v, "rcopy.o.vol.P2")])
try:
    CowChanges().changed(p1, p2)
    refused = ""
except SnapshotInvalid as e:
    refused = str(e)
OUT.update(valid_before=valid_before, valid_after=s.valid(p1), refused=refused,
           attr=lvm.get(VG, p1.name).attr, status=sh("dmsetup", "status", lvm.dm_name(VG, p1.name)).strip())
"""


def test_overflowed_dm_snapshot_is_invalid(clean_lab):
    out = run_guest(clean_lab, OVERFLOW)
    assert out["valid_before"] and not out["valid_after"]
    assert out["status"].endswith("Invalid") and out["attr"][4] == "I"
    assert "invalid" in out["refused"] and "full" in out["refused"]
