"""rcopy.changes.scan on real temp files: finds exactly the blocks written, nothing else."""
import errno
import io
import mmap
import pathlib
import random
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcopy import native
from rcopy.changes import scan as scanmod
from rcopy.changes.scan import scan
from rcopy.errors import DeviceError, UsageError
from rcopy.extent import Extent

from .test_native import ref_extents, ref_flags

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def write_pair(tmp_path, old: bytes, new: bytes):
    o, n = tmp_path / "old", tmp_path / "new"
    o.write_bytes(old)
    n.write_bytes(new)
    return o, n


def restrict(flags, ranges, block_size):
    """Reference restriction: flags of blocks no range touches become 0 (unchanged, not read)."""
    keep = bytearray(len(flags))
    for r in ranges:
        for b in range(r.offset // block_size, min(-(-r.end // block_size), len(flags))):
            keep[b] = 1
    return bytes(f if k else 0 for f, k in zip(flags, keep))


@st.composite
def files(draw):
    block_size = draw(st.sampled_from([512, 4096, 65536]))
    size = draw(st.integers(0, 40)) * block_size + draw(st.sampled_from([0, 1, block_size - 1]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    old = bytearray(rnd.randbytes(size)) if draw(st.booleans()) else bytearray(size)
    new = bytearray(old)
    nblocks = -(-size // block_size)
    for b in draw(st.lists(st.integers(0, max(nblocks - 1, 0)), max_size=12 if nblocks else 0)):
        start, end = b * block_size, min((b + 1) * block_size, size)
        kind = rnd.choice(["byte", "zero", "fill"])
        if kind == "byte":
            new[rnd.randrange(start, end)] ^= 0xFF
        elif kind == "zero":
            new[start:end] = bytes(end - start)
        else:
            new[start:end] = rnd.randbytes(end - start)
    chunk = block_size * draw(st.integers(1, 9))
    depth = draw(st.integers(1, 3))
    return block_size, bytes(old), bytes(new), chunk, depth


@SETTINGS
@given(files(), st.booleans())
def test_scan_finds_exactly_the_blocks_written(tmp_path, monkeypatch, case, direct):
    monkeypatch.setattr(scanmod, "PIECE_SIZE", 1024)   # several C pieces per compare call
    block_size, old, new, chunk, depth = case
    o, n = write_pair(tmp_path, old, new)
    want = ref_extents(ref_flags(old, new, block_size), block_size, len(new))
    got = list(scan(o, n, block_size=block_size, chunk_size=chunk, depth=depth, direct=direct))
    assert got == want


@SETTINGS
@given(files(), st.data(), st.booleans())
def test_scan_restricted_to_candidate_ranges(tmp_path, monkeypatch, case, data, direct):
    monkeypatch.setattr(scanmod, "PIECE_SIZE", 1024)
    block_size, old, new, chunk, depth = case
    size = len(new)
    cuts = sorted(data.draw(st.sets(st.integers(0, size + 3 * block_size), max_size=10)))
    ranges = [Extent(a, b - a) for a, b in zip(cuts[::2], cuts[1::2])]
    o, n = write_pair(tmp_path, old, new)
    want = ref_extents(restrict(ref_flags(old, new, block_size), ranges, block_size), block_size, size)
    got = list(scan(o, n, ranges=ranges, block_size=block_size, chunk_size=chunk, depth=depth, direct=direct))
    assert got == want


@SETTINGS
@given(files(), st.booleans())
def test_scan_against_nothing_is_a_full_sync(tmp_path, monkeypatch, case, direct):
    monkeypatch.setattr(scanmod, "PIECE_SIZE", 1024)
    block_size, _, new, chunk, depth = case
    n = tmp_path / "new"
    n.write_bytes(new)
    want = ref_extents(ref_flags(None, new, block_size), block_size, len(new))
    assert list(scan(None, n, block_size=block_size, chunk_size=chunk, depth=depth, direct=direct)) == want
    assert sum(e.length for e in want) == len(new)


def test_zero_in_both_is_unchanged_zeroed_is_a_zero_extent_and_short_tail(tmp_path):
    bs = 4096
    old = bytearray(random.Random(1).randbytes(10 * bs + 100))
    old[bs:2 * bs] = bytes(bs)                        # zero in both: unchanged
    new = bytearray(old)
    new[3 * bs:5 * bs] = bytes(2 * bs)                # zeroed: one zero extent
    new[5 * bs] ^= 1                                  # adjacent data stays a separate extent
    new[-1] ^= 1                                      # the short last block
    o, n = write_pair(tmp_path, bytes(old), bytes(new))
    assert list(scan(o, n, block_size=bs)) == [
        Extent(3 * bs, 2 * bs, zero=True), Extent(5 * bs, bs), Extent(10 * bs, 100)]


def test_size_mismatch_is_refused_unless_size_given(tmp_path):
    o, n = write_pair(tmp_path, bytes(8192), bytes(4096) + b"x" * 4096 + b"tail")
    with pytest.raises(scanmod.SizeMismatch) as e:
        scan(o, n)
    assert str(o) in str(e.value) and "8192" in str(e.value) and "8196" in str(e.value)
    assert list(scan(o, n, size=8192)) == [Extent(4096, 4096)]
    with pytest.raises(scanmod.TooSmall):
        scan(o, n, size=8193)


@pytest.mark.parametrize("bad", ["missing", "dir"])
def test_unreadable_path_is_a_device_error(tmp_path, bad):
    o, n = write_pair(tmp_path, bytes(4096), bytes(4096))
    path = tmp_path / "nope" if bad == "missing" else tmp_path
    for args in ((path, n), (o, path), (None, path)):
        with pytest.raises(scanmod.OpenError) as e:
            scan(*args)
        assert isinstance(e.value, DeviceError) and str(path) in str(e.value)


def test_short_read_names_path_and_offset(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes(5000))
    src = scanmod.Source.open(p, direct=False)
    with mmap.mmap(-1, 8192) as buf:
        with pytest.raises(scanmod.ShortRead) as e:
            src.read_into(buf, 4096, 4096)
    src.close()
    assert isinstance(e.value, DeviceError)
    assert str(p) in str(e.value) and "offset 5000" in str(e.value)


def test_read_error_names_path_and_offset():
    # /proc/self/mem fails with EIO where nothing is mapped (address 0): a real read error, no root needed.
    src = scanmod.Source("/proc/self/mem", io.FileIO("/proc/self/mem", "rb"), 4096, False)
    with mmap.mmap(-1, 4096) as buf:
        with pytest.raises(scanmod.ReadError) as e:
            src.read_into(buf, 0, 4096)
    src.close()
    assert isinstance(e.value, DeviceError) and "/proc/self/mem" in str(e.value) and "offset 0" in str(e.value)


@pytest.mark.parametrize("direct", [False, True])
def test_read_error_during_scan_reaches_the_caller(tmp_path, monkeypatch, direct):
    o, n = write_pair(tmp_path, bytes(64 * 4096), b"\x01" * (64 * 4096))

    def failing(self, buf, offset, length):   # the O_DIRECT path reads in Python
        raise scanmod.ReadError(path=self.path, offset=offset, reason="Input/output error")

    def failing_fds(flags, fd_old, fd_new, offset, *a, **kw):   # the buffered path reads in C
        raise native.FdReadError(which="new", offset=offset + 4096, errno=errno.EIO)

    monkeypatch.setattr(scanmod.Source, "read_into", failing)
    monkeypatch.setattr(native, "compare_fds", failing_fds)
    with pytest.raises(scanmod.ReadError) as e:
        list(scan(o, n, chunk_size=4 * 4096, direct=direct))
    assert str(n if not direct else o) in str(e.value)
    assert f"offset {4096 if not direct else 0}" in str(e.value) and "Input/output error" in str(e.value)
    assert not _readers()


def _readers():
    return [t for t in threading.enumerate() if t.name.startswith(scanmod.READER_THREAD)]


def test_closing_early_stops_the_reader_and_read_ahead_is_bounded(tmp_path, monkeypatch):
    size = 256 * 4096
    o, n = write_pair(tmp_path, bytes(size), (b"\x01" * 4096 + bytes(4096)) * (size // 8192))
    reads = []
    real = scanmod.Source.read_into
    monkeypatch.setattr(scanmod.Source, "read_into", lambda *a: (reads.append(a[2]), real(*a)))
    it = scan(o, n, chunk_size=8 * 4096, depth=2, direct=True)   # O_DIRECT: the threaded mode
    assert next(it) == Extent(0, 4096)
    assert _readers()
    assert len(reads) <= 2 * (2 + 1)   # two files x (depth chunks + the one handed back)
    it.close()
    assert not _readers()
    assert len(reads) <= 2 * (2 + 1)


def test_unsorted_ranges_and_bad_arguments(tmp_path):
    o, n = write_pair(tmp_path, bytes(8192), bytes(8192))
    with pytest.raises(scanmod.BadRanges):
        list(scan(o, n, ranges=[Extent(4096, 10), Extent(0, 10)]))
    with pytest.raises(scanmod.BadRanges):
        list(scan(o, n, ranges=[Extent(0, 4096), Extent(100, 10)]))
    with pytest.raises(UsageError):
        scan(o, n, block_size=1000)
    with pytest.raises(scanmod.BadChunkSize):
        scan(o, n, chunk_size=6000)
    with pytest.raises(native.KernelUnavailable):
        scan(o, n, kernel="nope")
    assert not _readers()


def test_ranges_are_aligned_out_clamped_and_merged(tmp_path):
    bs = 4096
    old = bytes(8 * bs + 10)
    new = bytearray(old)
    for b in range(9):
        new[b * bs] = 1
    o, n = write_pair(tmp_path, old, bytes(new))
    ranges = [Extent(bs + 5, 1), Extent(bs + 100, 1), Extent(3 * bs - 1, 2), Extent(8 * bs + 5, 1 << 30)]
    assert list(scan(o, n, ranges=ranges)) == [Extent(bs, 3 * bs), Extent(8 * bs, 10)]


def test_direct_falls_back_where_refused():
    # tmpfs (/dev/shm) refuses O_DIRECT with EINVAL: the scan reads buffered instead.
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        o, n = write_pair(pathlib.Path(d), bytes(3 * 4096 + 1), bytes(2 * 4096) + b"x" * 4097)
        assert list(scan(o, n, direct=True)) == [Extent(2 * 4096, 4097)]


def test_drop_cache_gives_the_same_answer(tmp_path):
    old = random.Random(2).randbytes(50 * 4096)
    new = bytearray(old)
    new[7 * 4096 + 3] ^= 1
    o, n = write_pair(tmp_path, old, bytes(new))
    assert list(scan(o, n, drop_cache=True, chunk_size=4 * 4096)) == [Extent(7 * 4096, 4096)]
