"""The fault campaign (scripts/faults, rcopylab.faults) with fixed seeds in CI: every fault kind once,
split in three so two lab instances share them. Longer campaigns run outside CI (README "Tests")."""
import pytest

from rcopylab import faults

pytestmark = pytest.mark.lab

SETS = {
    "link-and-agent": ("link-short", "link-long", "link2", "kill-agent"),
    "power-and-signals": ("crash-primary", "crash-backup", "kill-primary", "term-primary"),
    "disk-space-and-control-link": ("read-error", "pool-full", "link1"),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_fault_kind_leaves_one_sync_point_and_recovers(clean_lab, name):
    lines = []
    survived, lost, broken = faults.campaign(clean_lab, seed=11, runs=len(SETS[name]), kinds=SETS[name],
                                             say=lines.append)
    print("\n".join(lines))
    assert (survived, lost, broken) == (len(SETS[name]), 0, 0), "\n".join(lines)
