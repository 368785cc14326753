"""Snapshot back-ends and their wrappers on real LVM/device-mapper: every mutating wrapper is
idempotent (zrepl's platformtest habit), snapshots are found, valid, and the thin pool's metadata
snapshot is always released."""
import pytest

from tests.lab.dm_guest import run_guest

pytestmark = pytest.mark.lab

WRAPPERS = """
from rcopy.sys import lvm, dmsetup
KIND = {kind!r}
v = volume(KIND, "vol", 8)
o = lvm.by_path(v)
make = (lambda: lvm.create_thin_snapshot(VG, "vol", "s1")) if KIND == "thin" else \\
       (lambda: lvm.create_cow_snapshot(VG, "vol", "s1", 4 << 20))
first, again = make(), make()
OUT["create_same"] = (first.name, first.thin_id, first.origin) == (again.name, again.thin_id, again.origin)
OUT["snapshot_active"] = again.active and os.path.exists(again.path)
try:
    lvm.create_thin_snapshot(VG, "other", "s1") if KIND == "thin" else lvm.create_cow_snapshot(VG, "other", "s1", 4 << 20)
    OUT["foreign_refused"] = False
except Exception as e:
    OUT["foreign_refused"] = type(e).__name__
lvm.rename(VG, "s1", "s2"); lvm.rename(VG, "s1", "s2")
OUT["renamed"] = lvm.get(VG, "s2") is not None and lvm.get(VG, "s1") is None
dmsetup.suspend(o.dm_name); dmsetup.suspend(o.dm_name)
OUT["suspended"] = dmsetup.info(o.dm_name)["suspended"]
dmsetup.resume(o.dm_name); dmsetup.resume(o.dm_name)
OUT["resumed"] = dmsetup.info(o.dm_name)["suspended"]
OUT["removed"] = [lvm.remove(VG, "s2"), lvm.remove(VG, "s2")]
"""


@pytest.mark.parametrize("kind", ["thin", "cow"])
def test_lvm_and_dmsetup_wrappers_are_idempotent(clean_lab, kind):
    out = run_guest(clean_lab, WRAPPERS.format(kind=kind))
    assert out["create_same"] and out["snapshot_active"]
    assert out["foreign_refused"] == "AlreadyExists"
    assert out["renamed"]
    assert (out["suspended"], out["resumed"]) == ("Suspended", "Active")
    assert out["removed"] == [True, False]


BACKEND = """
from rcopy import backends
from rcopy.snapshot.select import backend_name
KIND = {kind!r}
a, b = volume(KIND, "a", 8), volume(KIND, "b", 8)
s = backends.for_device(a).snapshotter
req = [(a, "rcopy.g.a.P1"), (b, "rcopy.g.b.P1")]
one, two = s.cut(req), s.cut(req)
OUT.update(backend=s.backend, detected=backend_name(a)[0], same=one == two,
           paths=[os.path.exists(x.path) for x in one], valid=[s.valid(x) for x in one],
           found=s.find(a, "rcopy.g.a.P1") == one[0], not_found=s.find(a, "rcopy.g.a.P9") is None)
# a cut interrupted after one snapshot: the survivor is from another instant, so it is re-taken
s.delete(one[1])
gone = s.find(b, one[1].name) is None
s.delete(one[1])                                  # a second delete of a missing snapshot is a quiet no-op
OUT["deleted_twice"] = gone and s.find(b, one[1].name) is None and s.find(a, one[0].name) == one[0]
three = s.cut(req)
OUT.update(recut=[x.name for x in three])
for x in three:
    s.delete(x)
OUT["all_gone"] = [s.find(x.origin, x.name) for x in three] == [None, None]
"""


@pytest.mark.parametrize("kind", ["thin", "cow"])
def test_backend_cut_find_delete_are_idempotent(clean_lab, kind):
    out = run_guest(clean_lab, BACKEND.format(kind=kind))
    assert out["backend"] == out["detected"] == kind
    assert out["same"] and out["paths"] == [True, True] and out["valid"] == [True, True]
    assert out["found"] and out["not_found"]
    assert out["deleted_twice"]
    assert out["recut"] == ["rcopy.g.a.P1", "rcopy.g.b.P1"]
    assert out["all_gone"]


METASNAP = """
from rcopy.changes import thin as tc
from rcopy.sys import dmsetup, lvm, thin_tools
from rcopy.snapshot.thin import ThinSnapshotter
v = volume("thin", "vol", 8)
s = ThinSnapshotter()
(p1,) = s.cut([(v, "rcopy.m.vol.P1")])
(p2,) = s.cut([(v, "rcopy.m.vol.P2")])
a, b = lvm.by_path(p1.path), lvm.by_path(p2.path)
pool = tc.pool_device(VG, "pool")
held = lambda: dmsetup.parse_pool_status(dmsetup.status(pool)[0]).held_root
OUT["ok"] = tc.candidates(a, b) == []
OUT["held_after_ok"] = held()
bogus = lvm.LV(**dict(a.__dict__, thin_id=999))
try:
    tc.candidates(bogus, b)
    OUT["error"] = ""
except thin_tools.ThinDeltaError as e:
    OUT["error"] = str(e)
OUT["held_after_error"] = held()
dmsetup.message(pool, "reserve_metadata_snap")     # left held by a crashed run: released and re-taken
OUT["stale_ok"] = tc.candidates(a, b) == []
OUT["held_after_stale"] = held()
"""


def test_thin_metadata_snapshot_is_always_released(clean_lab):
    out = run_guest(clean_lab, METASNAP)
    assert out["ok"] and out["stale_ok"]
    assert "thin_delta" in out["error"]
    assert out["held_after_ok"] is None and out["held_after_error"] is None and out["held_after_stale"] is None


HALF_MADE = """
from rcopy.snapshot.cow import CowSnapshotter
from rcopy.sys import lvm
v = volume("cow", "vol", 8)
s = CowSnapshotter()
size = s.cow_size(lvm.by_path(v), "rcopy.g.vol.P2")
# what lvcreate -s leaves when stopped between its two metadata commits: its COW store, a plain LV
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", f"{size // 1024}k", "-n", "rcopy.g.vol.P2", VG)
left = lvm.get(VG, "rcopy.g.vol.P2")
OUT["left"] = [left.segtype, left.attr[:1], left.size == size]
(snap,) = s.cut([(v, "rcopy.g.vol.P2")])
now = lvm.get(VG, "rcopy.g.vol.P2")
OUT["taken"] = [now.is_cow_snapshot, now.origin, s.valid(snap)]
# the same name on an LV of another size is somebody's: refused, kept
sh("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", f"{size // 1024 + 4096}k", "-n", "rcopy.g.vol.P3", VG)
try:
    s.cut([(v, "rcopy.g.vol.P3")])
    OUT["other"] = "taken"
except Exception as e:
    OUT["other"] = type(e).__name__
OUT["kept"] = lvm.get(VG, "rcopy.g.vol.P3") is not None
"""


def test_what_an_interrupted_thick_snapshot_left_is_cleared_by_the_next_cut(clean_lab):
    """Found by the fault campaign (seed 1201, term-primary): a sync killed inside ``lvcreate -s`` left
    the snapshot's COW store as a plain LV, and every later sync refused the group."""
    out = run_guest(clean_lab, HALF_MADE)
    assert out["left"] == ["linear", "-", True]
    assert out["taken"] == [True, "vol", True]
    assert out["other"] == "Refused" and out["kept"]


SYNC_WINDOW = """
from rcopy import backends
from rcopy.snapshot.cow import CowSnapshotter
from rcopy.snapshot.thin import ThinSnapshotter
from rcopy.sys import lvm
vols = {"thin": volume("thin", "tv", 8), "cow": volume("cow", "kv", 8)}
snappers = {"thin": ThinSnapshotter(), "cow": CowSnapshotter()}
pairs = [(k, p) for k, p in vols.items()]
backends.protect(pairs, writable=False)                 # as admitted: read-only in LVM's metadata
snaps = {k: snappers[k].cut([(p, k + "R")])[0] for k, p in vols.items()}   # the begin's rollback points

def digest(p):
    import hashlib
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

held_data = [digest(p) for p in vols.values()]

def links():
    return all(os.path.islink(p) and os.path.realpath(p).startswith("/dev/dm-") for p in vols.values())

def writes(p):
    try:
        write_blocks(p, {3: os.urandom(BLOCK)})
        return True
    except OSError:
        return False

def lvm_perm():
    return sorted(lvm.by_path(p).attr[1] for p in vols.values())

OUT["before"] = [writes(p) for p in vols.values()]
held = backends.open_for_sync(pairs)
OUT["open"] = [writes(p) for p in vols.values()] + [links()]
lvm._Reports.changed()
OUT["open_lvm"] = lvm_perm()
# what a crash of the backup mid-sync leaves: LVM re-activates (here: refreshes) from its metadata
sh("lvchange", "-qq", "--refresh", *[lvm.by_path(p).full_name for p in vols.values()])
sh("udevadm", "settle")
OUT["after_refresh"] = [writes(p) for p in vols.values()]
# a rollback into the read-only origins (LVM refuses a classic merge into one: rcopy lifts it for the merge)
backends.open_for_sync(pairs)
for k, p in vols.items():
    snappers[k].rollback(snaps[k])
lvm._Reports.changed()
OUT["rolled_back_lvm"] = lvm_perm()
OUT["rolled_back_gone"] = [lvm.get(VG, k + "R") is None for k in vols]
OUT["rolled_back_data"] = [digest(p) for p in vols.values()] == held_data
backends.open_for_sync(pairs)
backends.protect(pairs, writable=False, group="g", mark="rcopy:g:2:x")
OUT["closed"] = [writes(p) for p in vols.values()] + [links()]
lvm._Reports.changed()
OUT["tags"] = sorted(t for p in vols.values() for t in lvm.by_path(p).tags)
"""


def test_a_sync_writes_the_secondaries_while_lvm_keeps_them_read_only(clean_lab):
    """Issue 15: the begin no longer runs ``lvchange -p rw`` nor the tidy-up ``-p r`` (each ~1.2 s per
    secondary here); only the live tables open and close. LVM's metadata never says writable, so a
    re-activation after a crash finds the secondaries read-only; a rollback still merges (a classic
    one needs LVM's permission lifted for the merge); the /dev/VG/LV links survive every flip."""
    out = run_guest(clean_lab, SYNC_WINDOW)
    assert out["before"] == [False, False]
    assert out["open"] == [True, True, True] and out["open_lvm"] == ["r", "r"]
    assert out["after_refresh"] == [False, False]
    assert out["rolled_back_lvm"] == ["r", "r"] and out["rolled_back_gone"] == [True, True]
    assert out["rolled_back_data"]
    assert out["closed"] == [False, False, True]
    assert out["tags"] == ["rcopy:g:2:x", "rcopy:g:2:x"]
