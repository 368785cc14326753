"""LVM report parsing and naming rules."""
import contextlib
import json

import pytest

from rcopy.errors import Refused
from rcopy.sys import lvm


def _report(**over):
    row = {"vg_name": "vg0", "lv_name": "data", "lv_path": "/dev/vg0/data", "lv_dm_path": "/dev/mapper/vg0-data",
           "lv_attr": "Vwi-a-tz--", "lv_size": "67108864", "segtype": "thin", "origin": "", "pool_lv": "pool",
           "thin_id": "1", "chunk_size": "0", "lv_active": "1", "lv_skip_activation": "0",
           "lv_snapshot_invalid": "0", "lv_merging": "0", "lv_merge_failed": "-1", "lv_device_open": "0",
           "lv_suspended": "0", "snap_percent": "", "vg_extent_size": "4194304"}
    row.update(over)
    return json.dumps({"report": [{"lv": [row]}]})


def test_parse_thin_lv():
    (lv,) = lvm.parse_lvs_json(_report())
    assert lv.is_thin and lv.thin_id == 1 and lv.size == 64 << 20 and lv.pool == "pool"
    assert lv.active and not lv.merge_failed and lv.full_name == "vg0/data" and lv.dm_name == "vg0-data"


def test_parse_cow_snapshot():
    (lv,) = lvm.parse_lvs_json(_report(lv_attr="swi-a-s---", segtype="linear", origin="data", pool_lv="",
                                       thin_id="", lv_name="rcopy.g.data.P1", lv_snapshot_invalid="1"))
    assert lv.is_cow_snapshot and lv.thin_id is None and lv.snapshot_invalid and lv.origin == "data"


def test_bad_json():
    with pytest.raises(lvm.LvmError):
        lvm.parse_lvs_json("{not json")


def test_dm_name_doubles_hyphens():
    assert lvm.dm_name("vg-a", "lv-b") == "vg--a-lv--b"
    assert lvm.dm_name("vg", "pool_tmeta") == "vg-pool_tmeta"
    assert lvm.dm_name("vg", "s", "cow") == "vg-s-cow"


@pytest.mark.parametrize("name", ["rcopy.g1.data.P3", "a+b_c-d", "x"])
def test_valid_names(name):
    assert lvm.check_name(name) == name


@pytest.mark.parametrize("name", ["-x", "a/b", "a b", "..", "é", ""])
def test_invalid_names(name):
    with pytest.raises(Refused):
        lvm.check_name(name)


DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"


def test_real_thin_report():
    lvs = {lv.name: lv for lv in lvm.parse_lvs_json((DATA / "lvs_thin.json").read_text())}
    p1 = lvs["rcopy.x.thinvol.P1"]
    assert p1.is_thin and p1.thin_id == 2 and p1.origin == "thinvol" and p1.pool == "pool" and p1.active
    assert not p1.skip_activation and not p1.snapshot_invalid and not p1.open
    assert lvs["pool"].chunk_size == 65536 and lvs["pool"].segtype == "thin-pool"
    assert lvs["[lvol0_pmspare]"].active is False          # lv_active is "" or "active", even with --binary
    assert lvs["thinvol"].volume_size == 16 << 20


def test_real_cow_reports():
    lvs = {lv.name: lv for lv in lvm.parse_lvs_json((DATA / "lvs_cow.json").read_text())}
    p1 = lvs["rcopy.x.thick.P1"]
    assert p1.is_cow_snapshot and p1.origin == "thick" and p1.chunk_size == 4096
    assert p1.size == 8 << 20 and p1.volume_size == 16 << 20      # lv_size is the COW store's
    assert not lvs["thick"].is_cow_snapshot
    (bad,) = lvm.parse_lvs_json((DATA / "lvs_cow_invalid.json").read_text())
    assert bad.snapshot_invalid and bad.attr[4] == "I" and bad.is_cow_snapshot


def test_tags_free_space_and_pool_usage_are_parsed():
    (lv,) = lvm.parse_lvs_json(_report(lv_tags="rcopy:g:3:abc,other", vg_free="1048576", data_percent="81.50",
                                       metadata_percent="4.00"))
    assert lv.tags == ("rcopy:g:3:abc", "other") and lv.vg_free == 1 << 20
    assert (lv.data_percent, lv.metadata_percent) == (81.5, 4.0)


def test_rollback_snapshots_cover_the_whole_volume_and_space_is_checked_first():
    """Issue 11 #4/#5: R(n) of a thick secondary must survive a full resync (the whole volume plus its
    exception table); P(n) holds one period (half the volume); a VG short of space refuses the sync
    with the numbers, before anything is created."""
    from rcopy.errors import NoSpace
    from rcopy.snapshot.cow import CowSnapshotter
    (o,) = lvm.parse_lvs_json(_report(lv_attr="-wi-a-----", segtype="linear", pool_lv="", thin_id="",
                                      lv_size=str(48 << 20), vg_extent_size=str(1 << 20), vg_free=str(60 << 20)))
    s = CowSnapshotter()
    r = s.cow_size(o, "rcopy.g.data.R3")
    assert r >= (48 << 20) + (48 << 20) // 256 and r % (1 << 20) == 0 and r <= (50 << 20)
    assert s.cow_size(o, "rcopy.g.data.P3") == 24 << 20
    s._check_space([o], ["rcopy.g.data.R3"])                      # 49 MiB of 60 MiB free: fine
    with pytest.raises(NoSpace, match=r"VG vg0 has 60 MiB free but its snapshots for this sync need 98 MiB"):
        s._check_space([o, o], ["rcopy.g.data.R3", "rcopy.g.other.R3"])


def test_a_thin_pool_past_the_limit_refuses_new_snapshots(monkeypatch):
    from rcopy.errors import NoSpace
    from rcopy.snapshot.thin import ThinSnapshotter
    (o,) = lvm.parse_lvs_json(_report())
    (pool,) = lvm.parse_lvs_json(_report(lv_name="pool", segtype="thin-pool", data_percent="85.00",
                                         metadata_percent="10.00"))
    monkeypatch.setattr(lvm, "get", lambda vg, name: pool)
    with pytest.raises(NoSpace, match=r"thin pool vg0/pool is 85% full \(data\)"):
        ThinSnapshotter()._check_space([o], ["rcopy.g.data.P2"])
    monkeypatch.setenv("RCOPY_POOL_LIMIT", "90")
    ThinSnapshotter()._check_space([o], ["rcopy.g.data.P2"])


class _FakeVG:
    """Just enough of rcopy.sys.lvm for backends.create_secondary: one VG, its LVs, what was created."""

    def __init__(self, monkeypatch, free_mib, lvs=()):
        self.made = []
        self.lvs = {lv.name: lv for lv in lvs}
        monkeypatch.setattr(lvm, "vg", lambda name: lvm.VG(name, free_mib << 20, 1 << 20) if name == "vg-dr" else None)
        monkeypatch.setattr(lvm, "get", lambda vg, name: self.lvs.get(name) if vg == "vg-dr" else None)
        monkeypatch.setattr(lvm, "create_volume", self.create)

    def create(self, vg, name, size, pool=""):
        self.made.append((vg, name, size, pool))
        return lvm.parse_lvs_json(_report(vg_name=vg, lv_name=name, lv_path=f"/dev/{vg}/{name}"))[0]


def test_create_secondary_makes_thick_in_vg_and_thin_in_pool(monkeypatch):
    from rcopy import backends
    (pool,) = lvm.parse_lvs_json(_report(vg_name="vg-dr", lv_name="pool-b", segtype="thin-pool",
                                         lv_size=str(64 << 20), data_percent="50.00", zero="zero"))
    fake = _FakeVG(monkeypatch, 100, [pool])
    assert backends.create_secondary("vg-dr", "app-log", 96 << 20, 96 << 20) == "/dev/vg-dr/app-log"
    assert backends.create_secondary("vg-dr/pool-b", "app-db", 512 << 20, 30 << 20) == "/dev/vg-dr/app-db"
    assert fake.made == [("vg-dr", "app-log", 96 << 20, ""), ("vg-dr", "app-db", 512 << 20, "pool-b")]


@pytest.mark.parametrize("spec,name,size,used,err,text", [
    ("vg-dr", "big", 101 << 20, 0, "NoSpace", "volume group vg-dr has 100 MiB free, big needs 101 MiB"),
    ("vg-dr/pool-b", "db", 512 << 20, 33 << 20, "NoSpace", "thin pool vg-dr/pool-b has 32 MiB free, the primary holds 33 MiB"),
    ("vg-dr/pool-zn", "db", 40 << 20, 1 << 20, "NoSpace",
     "thin pool vg-dr/pool-zn has 32 MiB free, a full copy into a pool without zeroing (-Zn) allocates 40 MiB"),
    ("vg-dr", "app-log", 1 << 20, 0, "AlreadyExists", "vg-dr/app-log already exists"),
    ("vg-nope", "x", 1 << 20, 0, "NotFound", "volume group vg-nope not found"),
    ("vg-dr/nopool", "x", 1 << 20, 0, "NotFound", "thin pool vg-dr/nopool not found"),
    ("vg-dr/app-log", "x", 1 << 20, 0, "NotFound", "thin pool vg-dr/app-log not found"),
    ("vg-dr", "odd", (1 << 20) + 512, 0, "Refused", "not a multiple of vg-dr's extent size"),
    ("vg-dr", "-x", 1 << 20, 0, "Refused", "invalid LV name"),
    ("../etc", "x", 1 << 20, 0, "Refused", "invalid LV name"),
])
def test_create_secondary_refuses_with_the_reason_and_creates_nothing(monkeypatch, spec, name, size, used, err, text):
    from rcopy import backends, errors
    (pool,) = lvm.parse_lvs_json(_report(vg_name="vg-dr", lv_name="pool-b", segtype="thin-pool",
                                         lv_size=str(64 << 20), data_percent="50.00", zero="zero"))
    (zn,) = lvm.parse_lvs_json(_report(vg_name="vg-dr", lv_name="pool-zn", segtype="thin-pool",
                                       lv_size=str(64 << 20), data_percent="50.00", zero="0"))
    (mine,) = lvm.parse_lvs_json(_report(vg_name="vg-dr", lv_name="app-log", segtype="linear", pool_lv=""))
    fake = _FakeVG(monkeypatch, 100, [pool, zn, mine])
    with pytest.raises(getattr(errors, err), match=text.replace("(", r"\(").replace(")", r"\)")):
        backends.create_secondary(spec, name, size, used)
    assert fake.made == []


def _secondaries(monkeypatch):
    """A thin, a linear, a striped and a raid1 secondary, read-only in LVM; what lvm and dmsetup were
    asked (no report beyond the first read, no device touched)."""
    from rcopy.sys import dmsetup, udev
    rows = {}
    for name, attr, seg in (("thin", "Vri-a-tz--", "thin"), ("lin", "-ri-a-----", "linear"),
                            ("str", "-ri-a-----", "striped"), ("mir", "rri-a-r---", "raid1")):
        (lv,) = lvm.parse_lvs_json(_report(lv_name=name, lv_path=f"/dev/vg0/{name}", lv_attr=attr, segtype=seg,
                                           lv_tags="rcopy:g:1:aa", pool_lv="pool" if seg == "thin" else "",
                                           thin_id="1" if seg == "thin" else ""))
        rows[lv.path] = lv
    seen = {"asked": [], "ran": [], "dm": [], "udev": []}
    monkeypatch.setattr(lvm, "by_path", lambda p: seen["asked"].append(p) or rows[p])
    monkeypatch.setattr(lvm, "_lvm", lambda *a, **k: seen["ran"].append(a))

    def set_writable(name, writable, hidden=False):
        if name == "vg0-lin-real":              # not an origin of classic snapshots: no such layer
            raise dmsetup.DmNotFound(name=name)
        seen["dm"].append((name, writable, hidden))
        return 1
    monkeypatch.setattr(dmsetup, "set_writable", set_writable)

    @contextlib.contextmanager
    def processed(wait=True):             # what udev would be waited for, and whether
        got = []
        yield got.append
        seen["udev"].append((wait, len(got)))
    monkeypatch.setattr(udev, "dm_events_processed", processed)
    return [("thin", "/dev/vg0/thin"), ("cow", "/dev/vg0/lin"), ("cow", "/dev/vg0/str"), ("cow", "/dev/vg0/mir")], seen


def test_a_sync_opens_the_secondaries_live_tables_and_leaves_lvm_read_only(monkeypatch):
    """Issue 15: no lvchange -p rw / -p r per sync (~1.2 s per LV each way in the lab). The tables LVM
    knows the stack of are reloaded read-write, lowest layer first; a raid1 one goes through LVM; the
    tidy-up after the commit re-tags with one lvchange and reloads the tables read-only, top first,
    from what the begin returned (no report)."""
    from rcopy import backends
    pairs, seen = _secondaries(monkeypatch)
    known = backends.resolve(pairs)
    held = backends.open_for_sync(pairs, known=known)
    assert seen["ran"] == [("lvchange", "-qq", "-p", "rw", "vg0/mir")]
    assert seen["dm"] == [("vg0-thin", True, False), ("vg0-lin", True, False),
                          ("vg0-str-real", True, True), ("vg0-str", True, False)]
    assert [held[p].attr[1] for _, p in pairs] == ["r", "r", "r", "w"]     # as LVM now has them
    seen["dm"].clear()
    backends.protect(pairs, writable=False, group="g", mark="rcopy:g:2:bb", known=held)
    assert len(seen["asked"]) == 4                         # still the one report read before the begin
    assert seen["ran"][1:] == [("lvchange", "-qq", "-p", "r", "--deltag", "rcopy:g:1:aa", "--addtag", "rcopy:g:2:bb",
                                "vg0/mir"),
                               ("lvchange", "-qq", "--deltag", "rcopy:g:1:aa", "--addtag", "rcopy:g:2:bb",
                                "vg0/thin", "vg0/lin", "vg0/str")]
    assert seen["dm"] == [("vg0-thin", False, False), ("vg0-lin", False, False),
                          ("vg0-str", False, False), ("vg0-str-real", False, True)]
    # a read-only flip waits for udev to put the /dev/VG/LV links back; a writable one removes none
    assert seen["udev"] == [(False, 4), (True, 4)]


def test_a_missing_secondary_device_fails_the_open_and_not_the_close(monkeypatch):
    """An LV whose top device is gone cannot be written by a sync: the begin fails; making it read-only
    finds nothing to do (its next activation reads LVM's read-only permission)."""
    from rcopy import backends
    from rcopy.sys import dmsetup
    pairs, seen = _secondaries(monkeypatch)
    monkeypatch.setattr(dmsetup, "set_writable", lambda name, w, hidden=False: (_ for _ in ()).throw(
        dmsetup.DmNotFound(name=name)))
    with pytest.raises(dmsetup.DmNotFound):
        backends.open_for_sync(pairs[:1])
    backends.protect(pairs[:1], writable=False)
    assert seen["ran"] == []


def test_a_role_change_still_sets_lvms_permission(monkeypatch):
    """Failover, group removal and dismissal make secondaries writable for good: LVM's permission, one
    lvchange, and read back from what the change returned."""
    from rcopy import backends
    pairs, seen = _secondaries(monkeypatch)
    held = backends.protect(pairs[:1], writable=True)
    assert seen["ran"] == [("lvchange", "-qq", "-p", "rw", "vg0/thin")] and held["/dev/vg0/thin"].attr[1] == "w"
    backends.protect(pairs[:1], writable=False, known=held)
    assert seen["ran"][1] == ("lvchange", "-qq", "-p", "r", "vg0/thin") and len(seen["asked"]) == 1


def test_an_lv_of_a_vg_shared_through_lvmlockd_is_refused_at_admit(monkeypatch, tmp_path):
    """Issue 14: a shared VG's LV may be active and written on other hosts; a snapshot here would miss it."""
    from rcopy.snapshot import select
    from rcopy.sys.udev import BlockDevice
    (shared,) = lvm.parse_lvs_json(_report(vg_name="vg-san", vg_lock_type="sanlock"))
    (local,) = lvm.parse_lvs_json(_report(vg_name="vg-san"))
    assert shared.lock_type == "sanlock" and local.lock_type == ""
    monkeypatch.setattr(select.udev, "device", lambda p: BlockDevice(p, "dm-3", 253, 3, 1 << 20, 512, "disk",
                                                                      "vg--san-data", "vg-san", "data"))
    found = {"lv": shared}
    monkeypatch.setattr(select.lvm, "by_path", lambda p: found["lv"])
    with pytest.raises(Refused, match=r"is in VG vg-san, shared through lvmlockd \(lock type sanlock\)"):
        select.backend_name(str(tmp_path))
    found["lv"] = local
    assert select.backend_name(str(tmp_path))[0] == "thin"
