"""The native and scanner tests again, on the AddressSanitizer + UBSan build (native/asan.py).

Runs inside the normal pytest run so CI exercises it: a read past a buffer, or any undefined behaviour,
in native/rcopy_cmp.c aborts the child and fails this test with the sanitizer's report.
"""
import pathlib
import sys

import pytest

from rcopy.sys.run import run

TOP = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.asan
def test_native_and_scan_tests_pass_under_asan_and_ubsan(tmp_path):
    res = run([sys.executable, TOP / "native" / "asan.py", "--workdir", tmp_path], timeout=600)
    report = f"{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    assert res.rc == 0, report
    assert f"rcopy-asan: rcopy.native runs on {tmp_path}/_rcopy_native_asan" in res.stdout, report
    assert " passed" in res.stdout and "failed" not in res.stdout and "error" not in res.stdout, report
