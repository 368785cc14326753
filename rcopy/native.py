"""Typed Python face of the C block-compare module (native/rcopy_cmp.h is the contract).

Buffers (bytes, bytearray, memoryview, mmap; read-only is fine) go to C through ``ffi.from_buffer``,
never copied; cffi's out-of-line API mode releases the GIL for the call, so the scanner's worker
threads read and compare chunks in parallel. Bad arguments raise UsageError subclasses here, before C sees
them; C's own return codes are mapped too, so a mismatch between the two is a loud error, not a wrong
answer.
"""
from __future__ import annotations

import dataclasses
import os

from rcopy.errors import DeviceError, RcopyError, UsageError
from rcopy.extent import Extent

ABI = 4  # must equal RCOPY_CMP_ABI in native/rcopy_cmp.h

try:
    from rcopy._native import ffi, lib
except ImportError as _e:  # pragma: no cover - only on a broken install
    _import_error: ImportError | None = _e
    ffi = lib = None
else:
    _import_error = None


class NativeModuleError(RcopyError):
    """{msg}: rerun scripts/setup to rebuild rcopy's native module"""


class BadBlockSize(UsageError):
    """block size {block_size} is not a power of two between 512 B and 1 MiB"""


class LengthMismatch(UsageError):
    """buffers differ in length ({old} vs {new} bytes): compare equally long buffers"""


class BadBuffer(UsageError):
    """{what} is not a contiguous byte buffer ({reason}): pass bytes, bytearray, mmap or a contiguous memoryview"""


class KernelUnavailable(UsageError):
    """compare kernel {kernel} cannot run here (available: {available})"""


class FdReadError(DeviceError):
    """{reason} reading the {which} file at offset {offset}"""

    def __init__(self, *, which: str, offset: int, errno: int):
        self.which, self.offset, self.errno = which, offset, errno
        reason = os.strerror(errno) if errno else "unexpected end of file"
        super().__init__(which=which, offset=offset, reason=reason)


def _check_module():
    if lib is None:
        raise NativeModuleError(f"rcopy._native cannot be imported ({_import_error})")
    if lib.rcopy_cmp_abi() != ABI:
        raise NativeModuleError(f"rcopy._native has ABI {lib.rcopy_cmp_abi()}, this rcopy needs {ABI}")


_check_module()

DIFF = lib.RCOPY_FLAG_DIFF
ZERO = lib.RCOPY_FLAG_ZERO
BLOCK_MIN = lib.RCOPY_BLOCK_MIN
BLOCK_MAX = lib.RCOPY_BLOCK_MAX
REFERENCE = lib.RCOPY_KERNEL_REF


@dataclasses.dataclass(frozen=True)
class Kernel:
    id: int
    name: str
    available: bool


_KERNELS = tuple(Kernel(k, ffi.string(lib.rcopy_kernel_name(k)).decode(), bool(lib.rcopy_kernel_available(k)))
                 for k in range(lib.rcopy_kernel_count()))


def kernels() -> list[Kernel]:
    """Every kernel the module knows, with whether this CPU can run it; id 0 is the reference."""
    return list(_KERNELS)


def best_kernel() -> Kernel:
    """The kernel used when none is forced."""
    return _KERNELS[lib.rcopy_kernel_best()]


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not lib.rcopy_block_size_valid(max(block_size, 0)):
        raise BadBlockSize(block_size=block_size)
    return block_size


def block_count(length: int, block_size: int) -> int:
    """Blocks ``length`` bytes make, a short last block included."""
    return -(-length // check_block_size(block_size))


def kernel_id(kernel: int | str | None) -> int:
    """The id of a kernel given by id or name (None: automatic); KernelUnavailable if it cannot run."""
    if kernel is None:
        return lib.RCOPY_KERNEL_AUTO
    for k in _KERNELS:
        if kernel in (k.id, k.name) and k.available:
            return k.id
    raise _unavailable(kernel)


def _unavailable(kernel) -> KernelUnavailable:
    return KernelUnavailable(kernel=kernel, available=", ".join(k.name for k in _KERNELS if k.available))


def _buffer(obj, what: str, writable: bool = False):
    """A cffi view of obj's memory (no copy); UsageError instead of cffi's TypeError/ValueError."""
    try:
        return ffi.from_buffer("uint8_t[]", obj, require_writable=writable)
    except (TypeError, ValueError, BufferError) as e:
        raise BadBuffer(what=what, reason=str(e)) from None


def compare_into(flags, old, new, block_size: int = 4096, *, kernel: int | str | None = None) -> int:
    """Write one flag byte per block of ``new`` into ``flags`` (writable, at least block_count long):
    0 equal, DIFF changed, DIFF|ZERO changed and all zero in ``new``. ``old=None`` compares against
    nothing (every block changed, zero blocks still marked). Returns the number of changed blocks.
    """
    check_block_size(block_size)
    k = kernel_id(kernel)
    with _buffer(new, "new") as pn, _buffer(flags, "flags", writable=True) as pf:
        n = len(pn)
        if old is None:
            rc = lib.rcopy_cmp_blocks(k, ffi.NULL, pn, n, block_size, pf, len(pf))
        else:
            with _buffer(old, "old") as po:
                if len(po) != n:
                    raise LengthMismatch(old=len(po), new=n)
                rc = lib.rcopy_cmp_blocks(k, po, pn, n, block_size, pf, len(pf))
    return _check_rc(rc, kernel=kernel, block_size=block_size, nblocks=block_count(n, block_size))


def _check_rc(rc: int, *, kernel, block_size: int, nblocks: int) -> int:
    if rc >= 0:
        return rc
    if rc == lib.RCOPY_EBLOCKSIZE:
        raise BadBlockSize(block_size=block_size)
    if rc == lib.RCOPY_EKERNEL:
        raise _unavailable(kernel)
    if rc == lib.RCOPY_EFLAGS:
        raise UsageError(f"flags buffer too small: need {nblocks} bytes, one per block")
    if rc == lib.RCOPY_EPIECE:
        raise UsageError(f"read buffers must be a non-zero multiple of the block size {block_size}")
    raise NativeModuleError(f"rcopy_cmp_blocks returned {rc}")


def compare(old, new, block_size: int = 4096, *, kernel: int | str | None = None) -> bytes:
    """The flag bytes of :func:`compare_into`, as a new bytes object."""
    flags = bytearray(block_count(_nbytes(new, "new"), block_size))
    compare_into(flags, old, new, block_size, kernel=kernel)
    return bytes(flags)


def _nbytes(obj, what: str) -> int:
    with _buffer(obj, what) as p:
        return len(p)


def compare_fds(flags, fd_old: int | None, fd_new: int, offset: int, length: int, block_size: int,
                buf_old, buf_new, *, kernel: int | str | None = None) -> int:
    """:func:`compare_into` over [offset, offset+length) of two open files, read and compared in C
    piece by piece (a piece is len(buf_new) bytes, a multiple of block_size: small, so each piece is
    compared while still in the CPU cache, and Python runs once per call, not once per piece).
    ``fd_old=None`` compares against nothing. Buffered I/O only. Raises FdReadError on a failed or
    short read, naming which file and the offset."""
    check_block_size(block_size)
    k = kernel_id(kernel)
    err = ffi.new("struct rcopy_io_error *")
    with _buffer(buf_new, "buf_new", writable=True) as pn, _buffer(flags, "flags", writable=True) as pf:
        if fd_old is None:
            rc = lib.rcopy_cmp_fds(k, -1, fd_new, offset, length, block_size, ffi.NULL, pn, len(pn),
                                   pf, len(pf), err)
        else:
            with _buffer(buf_old, "buf_old", writable=True) as po:
                if len(po) < len(pn):
                    raise LengthMismatch(old=len(po), new=len(pn))
                rc = lib.rcopy_cmp_fds(k, fd_old, fd_new, offset, length, block_size, po, pn, len(pn),
                                       pf, len(pf), err)
    if rc == lib.RCOPY_EIO:
        raise FdReadError(which=("old", "new")[err.which], offset=err.offset, errno=err.err)
    return _check_rc(rc, kernel=kernel, block_size=block_size, nblocks=block_count(length, block_size))


RUNS_PER_CALL = 4096   # runs fetched from C per call: bounds the scratch array, not the result


def flag_extents(flags, nblocks: int, block_size: int, *, offset: int = 0,
                 end: int | None = None) -> list[Extent]:
    """Extents of the changed runs in flags[:nblocks], block 0 at byte ``offset``; the last one is
    clipped to ``end`` (a short last block). Data and zero runs come out separately, in order.
    The runs are found in C (a regex over the flags cost 33 ms per GiB of volume at 4 KiB blocks)."""
    out: list[Extent] = []
    pos = ffi.new("size_t *", 0)
    runs = ffi.new("uint64_t[]", 3 * RUNS_PER_CALL)
    with _buffer(flags, "flags") as pf:
        if nblocks > len(pf):
            raise UsageError(f"{nblocks} blocks asked of {len(pf)} flags")
        while n := lib.rcopy_flag_runs(pf, nblocks, pos, runs, RUNS_PER_CALL):
            vals = ffi.unpack(runs, 3 * n)
            for i in range(0, 3 * n, 3):
                start = offset + vals[i] * block_size
                stop = start + vals[i + 1] * block_size
                if end is not None and stop > end:
                    stop = end
                out.append(Extent(start, stop - start, vals[i + 2] == DIFF | ZERO))
    return out


def diff_extents(old, new, block_size: int = 4096, *, offset: int = 0,
                 kernel: int | str | None = None) -> list[Extent]:
    """Changed extents of ``new`` vs ``old`` (None: vs nothing), uncoalesced across calls."""
    flags = compare(old, new, block_size, kernel=kernel)
    return list(flag_extents(flags, len(flags), block_size, offset=offset,
                             end=offset + _nbytes(new, "new")))


def bench_memcmp(a, b, block_size: int = 4096) -> int:
    """Benchmark ceiling: memcmp() block by block in C, nothing else; returns differing blocks."""
    check_block_size(block_size)
    with _buffer(a, "a") as pa, _buffer(b, "b") as pb:
        if len(pa) != len(pb):
            raise LengthMismatch(old=len(pa), new=len(pb))
        return lib.rcopy_bench_memcmp(pa, pb, len(pa), block_size)
