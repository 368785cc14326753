"""thin_delta XML reader: strict about structure, order and ids."""
import pytest

from rcopy.sys.thin_tools import Delta, Range, ThinDeltaError, parse_delta_xml

GOOD = """<superblock uuid="" time="1" transaction="3" data_block_size="128" nr_data_blocks="512">
  <diff left="1" right="2">
    <left_only begin="0" length="1"/>
    <different begin="3" length="2"/>
    <same begin="5" length="10"/>
    <right_only begin="15" length="4"/>
  </diff>
</superblock>
"""


def test_parses_ranges_and_block_size():
    d = parse_delta_xml(GOOD, left=1, right=2)
    assert d.data_block_size == 128 and d.block_bytes == 65536
    assert d.ranges[0] == Range("left_only", 0, 1)
    assert [(r.kind, r.begin, r.length) for r in d.changed()] == [
        ("left_only", 0, 1), ("different", 3, 2), ("right_only", 15, 4)]


def test_empty_diff_means_no_change():
    d = parse_delta_xml('<superblock data_block_size="128"><diff left="1" right="2"></diff></superblock>')
    assert d == Delta(1, 2, 128, ())


@pytest.mark.parametrize("body", [
    '<different begin="5" length="2"/><different begin="3" length="1"/>',      # unsorted
    '<different begin="3" length="3"/><right_only begin="5" length="1"/>',     # overlapping
    '<bogus begin="3" length="1"/>',                                           # unknown element
    '<different begin="3" length="0"/>',                                       # empty
    '<different begin="-1" length="2"/>',                                      # not a count
    '<different length="2"/>',                                                 # missing begin
])
def test_rejects_bad_ranges(body):
    with pytest.raises(ThinDeltaError):
        parse_delta_xml(f'<superblock data_block_size="128"><diff left="1" right="2">{body}</diff></superblock>')


def test_rejects_other_devices_and_bad_documents():
    with pytest.raises(ThinDeltaError, match="expected 1->3"):
        parse_delta_xml(GOOD, left=1, right=3)
    with pytest.raises(ThinDeltaError):
        parse_delta_xml("<superblock data_block_size='128'>")
    with pytest.raises(ThinDeltaError):
        parse_delta_xml('<superblock data_block_size="128"></superblock>')


DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"


def test_real_thin_delta_output():
    """thin_delta 0.9.0 -m from the lab: 64 KiB blocks 0, 6, 125 changed (writes to 4 KiB blocks 5,
    100, 2000); it lists <same> ranges too."""
    d = parse_delta_xml((DATA / "thin_delta_m.xml").read_text(), left=2, right=3)
    assert d.block_bytes == 65536
    assert [(r.begin, r.length) for r in d.changed()] == [(0, 1), (6, 1), (125, 1)]
    assert {r.kind for r in d.ranges} == {"same", "different"}
    assert d.ranges[-1].end == 256                      # 16 MiB / 64 KiB


def test_real_verbose_format_is_refused():
    with pytest.raises(ThinDeltaError):
        parse_delta_xml((DATA / "thin_delta_m_verbose.xml").read_text())
