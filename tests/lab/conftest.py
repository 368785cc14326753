"""Fixtures of the lab tests: one two-VM lab per session (scripts/lab's Lab), reset before each test.

``lab``       session-wide: reuses an instance that is already up and answering (else boots one),
              installs the working tree's rcopy in both VMs, and stops the VMs at the end unless
              RCOPY_LAB_KEEP=1. If the lab cannot start, every lab test ERRORS (never skips).
``clean_lab`` per test: crashed VMs started again, link up, empty data disks, no rcopy state.
The instance is $RCOPY_LAB_DIR (default <repo>/.lab). Under pytest-xdist each worker has its own instance,
<base>-<worker id> (.lab-gw0, .lab-gw1: tests/conftest.py's lab_instance_dir), and points RCOPY_LAB_DIR
at it, so `scripts/lab` run by a test drives the same VMs.
"""
import os
import sys

import pytest

from rcopy.errors import RcopyError
from rcopylab.labctl import Lab
from tests.conftest import forget_foreign_pidfiles, lab_instance_dir


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Everything under tests/lab needs the lab, marked or not (before the top conftest deselects)."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep) and not item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.lab)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def lab():
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:   # before Lab(): load() and any `scripts/lab` a test runs read the instance from the environment
        os.environ["RCOPY_LAB_DIR"] = str(lab_instance_dir(worker))
    lab = Lab(log=_log)
    forget_foreign_pidfiles(lab.cfg)
    try:
        lab.ensure_up()
    except RcopyError as e:
        pytest.fail(f"the lab did not start: {e}", pytrace=False)
    yield lab
    if not os.environ.get("RCOPY_LAB_KEEP"):
        lab.down()


@pytest.fixture
def clean_lab(lab):
    try:
        lab.reset()
    except RcopyError as e:
        pytest.fail(f"the lab did not reset: {e}", pytrace=False)
    return lab
