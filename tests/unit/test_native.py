"""rcopy.native: every kernel equals a plain-Python reference; bad input raises typed errors.

This file also runs, unchanged, against the AddressSanitizer/UBSan build (test_native_asan.py).
"""
import errno
import mmap
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcopy import native
from rcopy.errors import UsageError
from rcopy.extent import Extent, coalesce

KERNELS = [k for k in native.kernels() if k.available]


def ref_flags(old, new, block_size):
    """The contract in plain Python: 0 equal, 1 changed, 3 changed and all zero in new."""
    out = bytearray()
    for off in range(0, len(new), block_size):
        nb = bytes(new[off:off + block_size])
        if old is not None and bytes(old[off:off + block_size]) == nb:
            out.append(0)
        else:
            out.append(3 if nb.count(0) == len(nb) else 1)
    return bytes(out)


def ref_extents(flags, block_size, length, offset=0):
    """Per-block extents of the reference flags, merged where adjacent and of one kind."""
    out = []
    for i, f in enumerate(flags):
        if f:
            start = offset + i * block_size
            out.append(Extent(start, min(start + block_size, offset + length) - start, zero=f == 3))
    return list(coalesce(out))


def unaligned(data: bytes, shift: int, kind: str):
    """data as bytes, bytearray, a memoryview starting ``shift`` bytes into a larger buffer, or a
    malloc'd block of exactly its length ("exact": under ASan, a read one byte past it is caught)."""
    if kind == "bytes":
        return bytes(data)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "exact":
        buf = native.ffi.buffer(native.ffi.new("uint8_t[]", len(data)))
        buf[:] = data
        return buf
    return memoryview(bytearray(shift) + data + b"\xff" * 7)[shift:shift + len(data)]


@st.composite
def cases(draw):
    block_size = 1 << draw(st.integers(9, 20))
    nblocks = draw(st.integers(0, max(1, (192 << 10) // block_size)))
    tail = draw(st.sampled_from([0, 1, block_size - 1, draw(st.integers(0, block_size - 1))]))
    length = nblocks * block_size + tail
    total = nblocks + (tail > 0)
    rnd = random.Random(draw(st.integers(0, 2**32)))
    base = draw(st.sampled_from(["random", "zero", "sparse"]))
    if base == "random":
        old = bytearray(rnd.randbytes(length))
    else:
        old = bytearray(length)
        if base == "sparse" and length:
            for _ in range(4):
                old[rnd.randrange(length)] = rnd.randrange(1, 256)
    new = bytearray(old)
    edits = draw(st.lists(st.tuples(st.integers(0, max(total - 1, 0)),
                                    st.sampled_from(["first", "last", "any", "zero", "bothzero", "fill"])),
                          max_size=8 if total else 0))
    for b, kind in edits:
        start, end = b * block_size, min((b + 1) * block_size, length)
        pos = {"first": start, "last": end - 1, "any": rnd.randrange(start, end)}.get(kind)
        if pos is not None:
            new[pos] ^= rnd.randrange(1, 256)
        elif kind == "zero":
            new[start:end] = bytes(end - start)
        elif kind == "bothzero":
            new[start:end] = old[start:end] = bytes(end - start)
        else:
            new[start:end] = rnd.randbytes(end - start)
    shifts = draw(st.tuples(st.integers(0, 15), st.integers(0, 15)))
    kinds = draw(st.tuples(*[st.sampled_from(["bytes", "bytearray", "view", "exact"])] * 2))
    return (block_size, unaligned(old, shifts[0], kinds[0]), unaligned(new, shifts[1], kinds[1]))


PROP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROP
@given(cases())
def test_every_kernel_equals_reference(case):
    block_size, old, new = case
    want = ref_flags(old, new, block_size)
    for k in KERNELS:
        assert native.compare(old, new, block_size, kernel=k.id) == want, k.name
    assert native.diff_extents(old, new, block_size, offset=1 << 40) == ref_extents(want, block_size, len(new), 1 << 40)


@PROP
@given(cases())
def test_against_nothing_every_block_is_data_or_zero(case):
    block_size, _, new = case
    want = ref_flags(None, new, block_size)
    assert set(want) <= {1, 3}
    for k in KERNELS:
        assert native.compare(None, new, block_size, kernel=k.name) == want, k.name


@pytest.mark.parametrize("block_size", [512, 4096, 1 << 20])
@pytest.mark.parametrize("length_blocks", [0, 1, 3])
@pytest.mark.parametrize("tail", [0, 1, 127, 128, 129, 511])
def test_edge_sizes_all_equal_all_zero_all_different(block_size, length_blocks, tail):
    length = length_blocks * block_size + tail
    data = random.Random(length).randbytes(length)
    zero = bytes(length)
    flipped = bytes(b ^ 0x5A for b in data)
    n = native.block_count(length, block_size)
    for k in KERNELS:
        assert native.compare(data, data, block_size, kernel=k.id) == bytes(n)
        assert native.compare(zero, zero, block_size, kernel=k.id) == bytes(n)
        assert native.compare(data, zero, block_size, kernel=k.id) == ref_flags(data, zero, block_size)
        assert native.compare(data, flipped, block_size, kernel=k.id) == b"\x01" * n


def test_reference_kernel_is_zero_and_best_is_available():
    ks = native.kernels()
    assert ks[0].id == native.REFERENCE == 0 and ks[0].name == "ref" and ks[0].available
    assert native.best_kernel().available
    assert len({k.name for k in ks}) == len(ks)


@pytest.mark.parametrize("kernel", [99, -2, "nope"] + [k.id for k in native.kernels() if not k.available])
def test_forcing_a_kernel_that_cannot_run_raises(kernel):
    with pytest.raises(native.KernelUnavailable) as e:
        native.compare(b"a" * 512, b"a" * 512, 512, kernel=kernel)
    assert isinstance(e.value, UsageError) and str(kernel) in str(e.value)


@pytest.mark.parametrize("block_size", [0, -4096, 256, 511, 513, 1000, 3072, 2 << 20, 4096.0, True])
def test_bad_block_size(block_size):
    with pytest.raises(native.BadBlockSize) as e:
        native.compare(b"", b"", block_size)
    assert isinstance(e.value, UsageError) and "power of two" in str(e.value)


def test_length_mismatch():
    with pytest.raises(native.LengthMismatch) as e:
        native.compare(bytes(4096), bytes(4095))
    assert isinstance(e.value, UsageError) and "4096 vs 4095" in str(e.value)
    with pytest.raises(native.LengthMismatch):
        native.bench_memcmp(bytes(1), bytes(2))


def test_bad_buffers():
    with pytest.raises(native.BadBuffer):
        native.compare(memoryview(bytearray(8192))[::2], bytes(4096))
    with pytest.raises(native.BadBuffer):
        native.compare(bytes(4), "text")
    with pytest.raises(native.BadBuffer):   # flags must be writable
        native.compare_into(bytes(1), bytes(4096), bytes(4096))


def test_flags_too_small_and_bytes_past_the_blocks_untouched():
    with pytest.raises(UsageError):
        native.compare_into(bytearray(1), bytes(8192), bytes(8192), 4096)
    flags = bytearray(b"\xaa" * 4)
    assert native.compare_into(flags, bytes(8192), b"\x01" * 8192, 4096) == 2
    assert flags == b"\x01\x01\xaa\xaa"


def test_mmap_buffers_read_only(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(bytes(3 * 4096 + 10))
    new.write_bytes(bytes(4096) + b"x" * 4096 + bytes(4096 + 10))
    with old.open("rb") as fo, new.open("rb") as fn, \
            mmap.mmap(fo.fileno(), 0, access=mmap.ACCESS_READ) as mo, \
            mmap.mmap(fn.fileno(), 0, access=mmap.ACCESS_READ) as mn:
        assert native.compare(mo, mn, 4096) == b"\x00\x01\x00\x00"
    # the views were released: the mmaps closed without BufferError


def test_flag_extents_clips_the_short_last_block_and_splits_kinds():
    flags = bytes([1, 1, 3, 3, 0, 1, 3])
    got = list(native.flag_extents(flags, len(flags), 512, offset=1024, end=1024 + 6 * 512 + 100))
    assert got == [Extent(1024, 1024), Extent(2048, 1024, True), Extent(3584, 512),
                   Extent(4096, 100, True)]
    assert list(native.flag_extents(flags, 2, 512)) == [Extent(0, 1024)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 0, 0, 1, 3]), max_size=80), st.integers(0, 79), st.integers(1, 5),
       st.integers(0, 511))
def test_flag_extents_equal_the_reference_in_batches(flags, cut, per_call, short):
    flags = bytes(flags)
    nblocks = min(cut, len(flags))
    end = nblocks * 512 - short if nblocks and short else None
    want = ref_extents(flags[:nblocks], 512, end if end is not None else nblocks * 512, 0)
    saved = native.RUNS_PER_CALL
    try:
        native.RUNS_PER_CALL = per_call   # several C calls per conversion
        assert native.flag_extents(flags, nblocks, 512, end=end) == want
    finally:
        native.RUNS_PER_CALL = saved
    with pytest.raises(UsageError):
        native.flag_extents(flags, len(flags) + 1, 512)


def test_bench_memcmp_counts_differing_blocks():
    a = bytes(10 * 4096 + 1)
    b = bytearray(a)
    b[0] = b[5 * 4096 + 7] = b[-1] = 1
    assert native.bench_memcmp(a, b, 4096) == 3
    with pytest.raises(native.BadBlockSize):
        native.bench_memcmp(a, b, 100)


def test_compare_fds_equals_compare_on_files_piece_by_piece(tmp_path):
    rnd = random.Random(3)
    old = rnd.randbytes(37 * 512 + 100)
    new = bytearray(old)
    for b in (0, 5, 17, 36, 37):
        new[b * 512 + rnd.randrange(0, 100)] ^= 1
    new[10 * 512:12 * 512] = bytes(1024)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    with (tmp_path / "old").open("rb") as fo, (tmp_path / "new").open("rb") as fn:
        for offset, length in [(0, len(new)), (1024, 4096 + 3), (0, 0), (36 * 512, 612)]:
            want = native.compare(old[offset:offset + length], new[offset:offset + length], 512)
            for piece in (512, 1536, 8192):
                for k in KERNELS:
                    flags = bytearray(len(want))
                    n = native.compare_fds(flags, fo.fileno(), fn.fileno(), offset, length, 512,
                                           bytearray(piece), bytearray(piece), kernel=k.id)
                    assert bytes(flags) == want and n == sum(1 for f in want if f)
                    n = native.compare_fds(flags, None, fn.fileno(), offset, length, 512, None,
                                           bytearray(piece), kernel=k.id)
                    assert bytes(flags) == native.compare(None, new[offset:offset + length], 512)


def test_compare_fds_read_errors_name_the_file_and_offset(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes(5000))
    with p.open("rb") as f, open("/proc/self/mem", "rb") as mem:
        with pytest.raises(native.FdReadError) as e:
            native.compare_fds(bytearray(4), f.fileno(), f.fileno(), 0, 8192, 4096,
                               bytearray(4096), bytearray(4096))
        assert (e.value.which, e.value.offset, e.value.errno) == ("old", 5000, 0)
        assert "end of file" in str(e.value)
        # /proc/self/mem fails with EIO where nothing is mapped (address 0): a real read error.
        with pytest.raises(native.FdReadError) as e:
            native.compare_fds(bytearray(4), f.fileno(), mem.fileno(), 0, 4096, 4096,
                               bytearray(4096), bytearray(4096))
        assert (e.value.which, e.value.offset, e.value.errno) == ("new", 0, errno.EIO)
        with pytest.raises(UsageError):   # buffers not a multiple of the block size
            native.compare_fds(bytearray(4), None, f.fileno(), 0, 4096, 4096, None, bytearray(1000))


def test_c_return_codes_without_the_python_checks():
    """The C side validates on its own (it is the contract other callers get), one code per mistake."""
    lib, ffi = native.lib, native.ffi
    buf = ffi.new("uint8_t[]", 8192)
    flags = ffi.new("uint8_t[]", 2)
    err = ffi.new("struct rcopy_io_error *")
    cmp = lib.rcopy_cmp_blocks
    assert cmp(lib.RCOPY_KERNEL_AUTO, buf, buf, 8192, 4096, flags, 2) == 0
    assert cmp(0, buf, buf, 8192, 4000, flags, 2) == lib.RCOPY_EBLOCKSIZE
    assert cmp(0, buf, buf, 8192, 1 << 21, flags, 2) == lib.RCOPY_EBLOCKSIZE
    assert cmp(lib.RCOPY_KERNEL_COUNT, buf, buf, 8192, 4096, flags, 2) == lib.RCOPY_EKERNEL
    assert cmp(-7, buf, buf, 8192, 4096, flags, 2) == lib.RCOPY_EKERNEL
    assert cmp(0, buf, buf, 8193, 4096, flags, 2) == lib.RCOPY_EFLAGS
    assert cmp(0, buf, ffi.NULL, 8192, 4096, flags, 2) == lib.RCOPY_ENULL
    assert cmp(0, buf, ffi.NULL, 0, 4096, ffi.NULL, 0) == 0
    assert lib.rcopy_cmp_fds(0, -1, 0, 0, 8192, 4096, ffi.NULL, buf, 6000, flags, 2, err) == lib.RCOPY_EPIECE
    assert lib.rcopy_cmp_fds(0, 0, 0, 0, 8192, 4096, ffi.NULL, buf, 4096, flags, 2, err) == lib.RCOPY_ENULL
    assert lib.rcopy_kernel_name(lib.RCOPY_KERNEL_COUNT) == ffi.NULL
    assert lib.rcopy_block_count(1, 3) == 0
