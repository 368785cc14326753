"""dmsetup table/status parsers."""
import pytest

from rcopy.sys.dmsetup import DmError, Line, parse_lines, parse_pool_status, parse_snapshot_status


def test_parse_lines():
    lines = parse_lines("0 131072 snapshot 253:4 253:6 P 8\n")
    assert lines == [Line(0, 131072, "snapshot", ("253:4", "253:6", "P", "8"))]
    with pytest.raises(DmError):
        parse_lines("garbage here\n")


def test_snapshot_status():
    s = parse_snapshot_status(Line(0, 8, "snapshot", ("64/131072", "16")))
    assert s.valid and not s.overflow and (s.allocated_sectors, s.total_sectors, s.metadata_sectors) == (64, 131072, 16)
    assert not parse_snapshot_status(Line(0, 8, "snapshot", ("Invalid",))).valid
    o = parse_snapshot_status(Line(0, 8, "snapshot", ("Overflow",)))
    assert not o.valid and o.overflow
    assert not parse_snapshot_status(Line(0, 8, "snapshot-merge", ("Merge", "failed"))).valid
    with pytest.raises(DmError):
        parse_snapshot_status(Line(0, 8, "linear", ("253:1", "0")))


def test_pool_status():
    p = parse_pool_status(Line(0, 8, "thin-pool", tuple("1 14/1024 8/1024 - rw discard_passdown queue_if_no_space - 1024".split())))
    assert p.held_root is None and p.transaction == 1 and p.used_data == 8 and p.mode == "rw"
    p = parse_pool_status(Line(0, 8, "thin-pool", tuple("3 20/1024 8/1024 42 rw".split())))
    assert p.held_root == 42
