"""Fixtures of the lab tests: one two-VM lab per session (scripts/lab's Lab), reset before each test.

``lab``       session-wide: reuses an instance that is already up and answering (else boots one),
              installs the working tree's rcopy in both VMs, and stops the VMs at the end unless
              RCOPY_LAB_KEEP=1. If the lab cannot start, every lab test ERRORS (never skips).
``clean_lab`` per test: crashed VMs started again, link up, empty data disks, no rcopy state.
The instance is $RCOPY_LAB_DIR (default <repo>/.lab).
"""
import os
import sys

import pytest

from rcopy.errors import RcopyError
from rcopylab.labctl import Lab


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
    lab = Lab(log=_log)
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
