"""Run the native tests against an AddressSanitizer + UBSan build of native/rcopy_cmp.c.

    python native/asan.py [--workdir DIR] [pytest args...]   (default: the native and scan unit tests)

Builds the same C (native/build_ffi.py's builder) as the top-level module ``_rcopy_native_asan`` in a
work directory, then runs pytest in a fresh interpreter with libasan preloaded (a sanitized extension
loaded by an unsanitized python needs the runtime first) where ``rcopy._native`` is that module, so
``rcopy.native`` and everything above it run on the sanitized code. UBSan is built with
-fno-sanitize-recover: any undefined behaviour aborts the run. tests/unit/test_native_asan.py runs this
inside the normal pytest run, so CI exercises it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
MODULE = "_rcopy_native_asan"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
DEFAULT_TESTS = ["tests/unit/test_native.py", "tests/unit/test_scan.py"]
MARKER = "rcopy-asan: rcopy.native runs on "

# Runs in the child: swap the sanitized module in before anything imports rcopy.native.
BOOTSTRAP = f"""
import sys, {MODULE} as m
sys.modules["rcopy._native"] = m
import rcopy.native, pytest
assert rcopy.native.lib is m.lib
print("{MARKER}" + m.__file__, flush=True)
sys.exit(pytest.main(sys.argv[1:]))
"""


def _load_build_ffi():
    spec = importlib.util.spec_from_file_location("rcopy_build_ffi", os.path.join(HERE, "build_ffi.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(workdir: str) -> str:
    """Compile the sanitized module into workdir; returns the path of the shared object."""
    ffi = _load_build_ffi().builder(MODULE, absolute=True, py_limited_api=False,
                                    extra_compile_args=["-O1", "-g", *SANITIZE],
                                    extra_link_args=SANITIZE)
    return ffi.compile(tmpdir=workdir, verbose=False)


def libasan() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        sys.exit(f"asan: gcc does not know libasan.so ({path}): install libgcc-12-dev")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where to build (default: a temporary directory)")
    args, pytest_args = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="rcopy-asan-") as tmp:
        workdir = args.workdir or tmp
        build(workdir)
        env = dict(os.environ,
                   LD_PRELOAD=libasan(),
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   PYTHONMALLOC="malloc",   # every Python buffer gets ASan redzones, not pymalloc arenas
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
                   PYTHONPATH=os.pathsep.join(filter(None, [workdir, TOP, os.environ.get("PYTHONPATH")])),
                   HYPOTHESIS_STORAGE_DIRECTORY=os.path.join(workdir, ".hypothesis"))
        # --capture=sys leaves fd 2 alone, so a sanitizer report that aborts the run is not swallowed.
        cmd = [sys.executable, "-c", BOOTSTRAP, "-q", "-p", "no:cacheprovider", "--capture=sys",
               *(pytest_args or DEFAULT_TESTS)]
        return subprocess.run(cmd, cwd=TOP, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
