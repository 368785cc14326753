"""dm-snapshot persistent COW store: declared fields, area walking, end of table, validity."""
import struct

import pytest

from rcopy.sys import cow

CHUNK_SECTORS = 8                      # 4 KiB chunks: 256 exceptions per metadata area
CB = CHUNK_SECTORS * 512
EPA = CB // 16


def build(old_chunks, *, valid=1, total_chunks=None, magic=cow.MAGIC):
    """A COW store image with the given exceptions, laid out as dm-snap-persistent.c writes it."""
    n_areas = len(old_chunks) // EPA + 1
    total = total_chunks or cow.area_chunk(cow.Header(0, 0, 0, CHUNK_SECTORS), n_areas) + 1
    img = bytearray(total * CB)
    img[0:16] = cow.encode(cow.HEADER_FIELDS, cow.HEADER,
                           dict(magic=magic, valid=valid, version=1, chunk_size=CHUNK_SECTORS))
    hdr = cow.parse_header(bytes(img[:16])) if magic == cow.MAGIC else None
    for i, old in enumerate(old_chunks):
        area, slot = divmod(i, EPA)
        meta = cow.area_chunk(hdr, area)
        rec = cow.encode(cow.EXCEPTION_FIELDS, cow.EXCEPTION, dict(old_chunk=old, new_chunk=meta + 1 + slot))
        img[meta * CB + slot * 16: meta * CB + slot * 16 + 16] = rec
    return bytes(img)


def table_of(img):
    return cow.parse_table(lambda off, n: img[off:off + n], len(img))


def test_header_fields_are_kernel_layout():
    assert cow.HEADER.size == 16 and cow.EXCEPTION.size == 16
    raw = struct.pack("<IIII", 0x70416E53, 1, 1, 8)
    assert raw[:4] == b"SnAp"
    h = cow.parse_header(raw)
    assert (h.valid, h.version, h.chunk_bytes, h.exceptions_per_area) == (1, 1, 4096, 256)


def test_empty_table():
    t = table_of(build([]))
    assert t.valid and t.exceptions == () and list(cow.extents(t)) == []


def test_exceptions_and_merged_extents():
    t = table_of(build([7, 3, 4, 5, 100]))
    assert t.old_chunks() == [3, 4, 5, 7, 100]
    assert list(cow.extents(t)) == [(3 * CB, 3 * CB), (7 * CB, CB), (100 * CB, CB)]


def test_full_area_continues_into_next():
    chunks = list(range(EPA + 3))
    t = table_of(build(chunks))
    assert len(t.exceptions) == EPA + 3
    assert list(cow.extents(t)) == [(0, (EPA + 3) * CB)]


def test_exactly_full_last_area_ends_at_device_end():
    img = build(list(range(EPA)), total_chunks=cow.area_chunk(cow.Header(0, 0, 0, CHUNK_SECTORS), 1))
    assert len(table_of(img).exceptions) == EPA


def test_invalid_snapshot_has_no_usable_table():
    t = table_of(build([1, 2], valid=0))
    assert not t.valid and t.exceptions == ()


def test_rejects_foreign_data():
    with pytest.raises(cow.CowFormatError, match="no dm-snapshot header"):
        table_of(b"\0" * 8192)
    bad = bytearray(build([1]))
    bad[CB + 8:CB + 16] = struct.pack("<Q", 10 ** 6)        # new_chunk past the device
    with pytest.raises(cow.CowFormatError, match="outside"):
        table_of(bytes(bad))


def test_read_device_on_a_file(tmp_path):
    p = tmp_path / "cow.img"
    p.write_bytes(build([9, 10]))
    t = cow.read_device(str(p), direct=False)
    assert t.old_chunks() == [9, 10]
    with pytest.raises(cow.CowFormatError, match="not found"):
        cow.read_device(str(tmp_path / "missing"))


DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"


def test_real_cow_store():
    """The lab's P1 -cow device: origin chunks 5, 100, 2000, 2001 copied out to chunks 2..5."""
    img = (DATA / "cow_P1_first8k.bin").read_bytes()
    size = 8388608
    t = cow.parse_table(lambda off, n: img[off:off + n] if off + n <= len(img) else bytes(n), size)
    assert t.valid and t.header.chunk_bytes == 4096
    assert [(e.old_chunk, e.new_chunk) for e in t.exceptions] == [(5, 2), (100, 3), (2000, 4), (2001, 5)]
    assert list(cow.extents(t)) == [(5 * 4096, 4096), (100 * 4096, 4096), (2000 * 4096, 8192)]


def test_real_invalid_header():
    h = cow.parse_header((DATA / "cow_invalid_header.bin").read_bytes())
    assert h.valid == 0 and h.chunk_size == 8
