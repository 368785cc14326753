"""dmsetup table/status parsers."""
import pytest

from rcopy.sys.dmsetup import DmError, Line, parse_all, parse_lines, parse_pool_status, parse_snapshot_status


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


DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"


def test_real_thin_table_and_status():
    table = parse_all((DATA / "dmsetup_table_thin.txt").read_text())
    assert table["rcopytest-pool-tpool"][0].target == "thin-pool"
    assert table["rcopytest-rcopy.x.thinvol.P2"] == [Line(0, 32768, "thin", ("253:2", "3"))]
    status = parse_all((DATA / "dmsetup_status_thin.txt").read_text())
    pool = parse_pool_status(status["rcopytest-pool-tpool"][0])
    assert pool.held_root is None and pool.mode == "rw" and pool.total_data == 1024
    held = parse_lines((DATA / "dmsetup_status_pool_held.txt").read_text())
    assert parse_pool_status(held[0]).held_root == 83


def test_real_cow_table_and_status():
    table = parse_all((DATA / "dmsetup_table_cow.txt").read_text())
    assert table["rcopytest-rcopy.x.thick.P1"][0].args == ("253:1", "253:2", "P", "8")
    assert table["rcopytest-thick"][0].target == "snapshot-origin"
    status = parse_all((DATA / "dmsetup_status_cow.txt").read_text())
    s = parse_snapshot_status(status["rcopytest-rcopy.x.thick.P1"][0])
    assert s.valid and (s.allocated_sectors, s.total_sectors, s.metadata_sectors) == (48, 16384, 16)
    bad = parse_all((DATA / "dmsetup_status_cow_invalid.txt").read_text())
    assert not parse_snapshot_status(bad["rcopytest-rcopy.x.thick.P3"][0]).valid


def test_parse_all_rejects_unnamed_lines():
    with pytest.raises(DmError):
        parse_all("0 8 linear 253:1 0\n")
