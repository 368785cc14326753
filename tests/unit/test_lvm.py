"""LVM report parsing and naming rules."""
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
