"""cffi out-of-line API build of rcopy._native from the plain C in native/.

``ffibuilder`` is what setup.py builds at install. :func:`builder` makes the same module under another
name with other flags: tests/unit/test_native_asan.py uses it for the AddressSanitizer/UBSan build.
Out-of-line API mode releases the GIL around every C call, so chunks are read and compared in parallel.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def cdef_from_header(text: str) -> str:
    """rcopy_cmp.h as cffi's cdef: comments and preprocessor lines dropped, each constant's value left
    to the compiler ("..."), so the header stays the one place the interface is written."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        m = re.match(r"#define\s+(RCOPY_\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.startswith("#"):
            out.append(line)
    return "\n".join(out)


with open(os.path.join(HERE, "rcopy_cmp.h")) as _f:
    CDEF = cdef_from_header(_f.read())


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
