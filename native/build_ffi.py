"""cffi out-of-line API build of rcopy._native from the plain C in native/.

``ffibuilder`` is what setup.py builds at install. :func:`builder` makes the same module under another
name with other flags: tests/unit/test_native_asan.py uses it for the AddressSanitizer/UBSan build.
Out-of-line API mode releases the GIL around every C call, so a compare runs beside the reader thread.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

# The part of rcopy_cmp.h Python sees; "..." lets the compiler supply each constant's value.
CDEF = """
#define RCOPY_CMP_ABI ...
#define RCOPY_BLOCK_MIN ...
#define RCOPY_BLOCK_MAX ...
#define RCOPY_FLAG_DIFF ...
#define RCOPY_FLAG_ZERO ...
#define RCOPY_KERNEL_AUTO ...
#define RCOPY_KERNEL_REF ...
#define RCOPY_KERNEL_COUNT ...
#define RCOPY_EBLOCKSIZE ...
#define RCOPY_EFLAGS ...
#define RCOPY_EKERNEL ...
#define RCOPY_ENULL ...
#define RCOPY_EPIECE ...
#define RCOPY_EIO ...
struct rcopy_io_error { int err; int which; uint64_t offset; };
int rcopy_cmp_abi(void);
int rcopy_kernel_count(void);
const char *rcopy_kernel_name(int kernel);
int rcopy_kernel_available(int kernel);
int rcopy_kernel_best(void);
int rcopy_block_size_valid(size_t block_size);
size_t rcopy_block_count(size_t len, size_t block_size);
int64_t rcopy_cmp_blocks(int kernel, const uint8_t *old, const uint8_t *new_, size_t len,
                         size_t block_size, uint8_t *flags, size_t nflags);
int64_t rcopy_cmp_fds(int kernel, int fd_old, int fd_new, uint64_t offset, size_t len,
                      size_t block_size, uint8_t *buf_old, uint8_t *buf_new, size_t piece,
                      uint8_t *flags, size_t nflags, struct rcopy_io_error *err);
int64_t rcopy_bench_memcmp(const uint8_t *a, const uint8_t *b, size_t len, size_t block_size);
"""


def builder(module="rcopy._native", *, absolute=False, extra_compile_args=("-O2",),
            extra_link_args=(), py_limited_api=True) -> FFI:
    """An FFI builder of native/rcopy_cmp.c as ``module``.

    setuptools wants paths relative to the project root; a build elsewhere (absolute=True) needs them
    absolute.
    """
    path = (lambda p: p) if absolute else os.path.relpath
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        module,
        '#include "rcopy_cmp.h"',
        sources=[path(os.path.join(HERE, "rcopy_cmp.c"))],
        include_dirs=[path(HERE)],
        extra_compile_args=list(extra_compile_args),
        extra_link_args=list(extra_link_args),
        py_limited_api=py_limited_api,
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
