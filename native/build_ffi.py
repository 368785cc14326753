"""cffi out-of-line API build of rcopy._native from plain C in native/."""
import os
from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ffibuilder = FFI()
ffibuilder.cdef("int rcopy_cmp_abi(void);")
ffibuilder.set_source(
    "rcopy._native",
    '#include "rcopy_cmp.h"',
    sources=[os.path.relpath(os.path.join(HERE, "rcopy_cmp.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
