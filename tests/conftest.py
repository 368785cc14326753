"""Test-wide configuration: markers, capability probes, and a header saying what is enabled.

tests/unit needs no kernel feature and no root. tests/lab runs against the two-VM lab (scripts/lab); a lab
test is never skipped silently: if the lab cannot start the test errors. Set RCOPY_NO_LAB=1 to deselect
lab tests for a quick local run (the header then says so, loudly). The lab's package, rcopylab, lives in
scripts/ (scripts/lab is its command line); it is put on the import path here.
"""
import os
import shutil
import sys
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parent.parent / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)


def _servers():
    return {name: bool(shutil.which(name)) for name in ("nbdkit", "qemu-nbd", "nbd-server", "nbdcopy")}


def pytest_report_header(config):
    lab = "DESELECTED (RCOPY_NO_LAB=1)" if os.environ.get("RCOPY_NO_LAB") else "enabled (scripts/lab)"
    servers = ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in _servers().items())
    return [f"rcopy: lab tests {lab}; root={'yes' if os.geteuid() == 0 else 'no'}", f"rcopy: NBD servers: {servers}"]


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("RCOPY_NO_LAB"):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("lab") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
