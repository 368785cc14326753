"""Test-wide configuration: markers, capability probes, and a header saying what is enabled.

tests/unit needs no kernel feature and no root. tests/lab runs against the two-VM lab (scripts/lab); a lab
test is never skipped silently: if the lab cannot start the test errors. Set RCOPY_NO_LAB=1 to deselect
lab tests for a quick local run (the header then says so, loudly). The lab's package, rcopylab, lives in
scripts/ (scripts/lab is its command line); it is put on the import path here.

Parallel runs (pytest-xdist, as scripts/test does with ``-n 2 --dist loadgroup``): every xdist worker
drives its own lab instance, ``<base>-<worker id>`` (``.lab-gw0``, ``.lab-gw1``; the base is
$RCOPY_LAB_DIR, default <repo>/.lab), so two labs run side by side. Under loadgroup the host tests form
one work unit ("unit": they run one after another on one worker, never two at once), and each lab test is
a work unit of its own, longest first (the scheduler below). The controller stops every worker's VMs at
the end (also those of a worker that crashed) unless RCOPY_LAB_KEEP=1. RCOPY_LAB_INSTANCES (scripts/test)
sets how many workers, hence labs, run.
"""
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = str(REPO / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

# The base instance as the run was started (a worker later points RCOPY_LAB_DIR at its own instance).
LAB_BASE = Path(os.environ.get("RCOPY_LAB_DIR") or REPO / ".lab")


def _servers():
    return {name: bool(shutil.which(name)) for name in ("nbdkit", "qemu-nbd", "nbd-server", "nbdcopy")}


def xdist_workers(config) -> int:
    """How many xdist workers this run distributes to (0: no xdist, tests run in this process)."""
    if getattr(config.option, "dist", "no") == "no":
        return 0
    return int(getattr(config.option, "numprocesses", 0) or 0)


def lab_instance_dir(worker: str | None = None) -> Path:
    """The lab instance of an xdist worker ("gw0" -> <base>-gw0); the base itself without xdist.

    Ports derive from a hash of the instance path (rcopylab.config), so two paths can collide (1 in 4000);
    gwN skips to <base>-gwN-1, -2... when its ports would be those of a lower-numbered worker's instance.
    The result depends only on the base and the worker id, so the controller and the worker agree.
    """
    if not worker:
        return LAB_BASE
    from rcopylab.config import load
    m = re.fullmatch(r"gw(\d+)", worker)
    names = [f"gw{i}" for i in range(int(m.group(1)) + 1)] if m else [worker]
    taken, path = set(), LAB_BASE
    for name in names:
        for k in range(100):
            path = LAB_BASE.with_name(f"{LAB_BASE.name}-{name}" + (f"-{k}" if k else ""))
            port = load({**os.environ, "RCOPY_LAB_DIR": str(path)}).base_port
            if port not in taken:
                taken.add(port)
                break
    return path


def forget_foreign_pidfiles(cfg) -> None:
    """Drop a VM pidfile of this instance whose pid now belongs to another process.

    A stale instance (a killed run) keeps its qemu.pid; if the pid was reused by another lab instance's
    qemu, rcopylab.vm.Vm.pid() (which checks only "rcopy-lab-<host>" in the command line) would take it
    for ours, and down() would SIGKILL someone else's VM. Our qemu's command line names our disks."""
    from rcopylab.config import HOSTS
    for host in HOSTS:
        pidfile = cfg.vm_dir(host) / "qemu.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            if pidfile.exists():
                pidfile.unlink(missing_ok=True)   # the process is gone: nothing to stop
            continue
        except (OSError, ValueError, IndexError):
            continue
        if str(cfg.vm_dir(host)).encode() + b"/" not in cmdline:
            pidfile.unlink(missing_ok=True)


def pytest_report_header(config):
    if os.environ.get("RCOPY_NO_LAB"):
        lab = "DESELECTED (RCOPY_NO_LAB=1)"
    elif xdist_workers(config):
        n = xdist_workers(config)
        dirs = ", ".join(lab_instance_dir(f"gw{i}").name for i in range(n))
        lab = (f"enabled (scripts/lab) on {n} lab instances in parallel, one per xdist worker "
               f"({dirs} in {LAB_BASE.parent}; --dist {config.option.dist})")
    else:
        lab = f"enabled (scripts/lab) on 1 lab instance ({LAB_BASE})"
    servers = ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in _servers().items())
    return [f"rcopy: lab tests {lab}; root={'yes' if os.geteuid() == 0 else 'no'}", f"rcopy: NBD servers: {servers}"]


# --- parallel runs (pytest-xdist, --dist loadgroup) ----------------------------------------------------
# xdist's loadgroup learns groups from "@group" suffixes that its worker writes into node ids; pytest 9.2
# ignores that write (pytest-xdist issue 1386), so marks alone would not group anything. The grouping is
# therefore decided here, on the controller, from the node ids: every host test (outside tests/lab) is one
# work unit "unit", run one after another by one worker (their NBD servers never race for free ports,
# and they leave the other worker to the lab); every lab test is a work unit of its own (they share
# nothing but the session's lab, and each worker has its own), handed out longest first so that the
# last ones to start are short: a worker queues up to two tests ahead, which must not be long ones.
LAB_LONGEST_FIRST = (   # longest lab tests first; seconds from a full run on a 2-core TCG host (--durations)
    "tests/lab/test_faults.py::test_every_fault_kind_leaves_one_sync_point_and_recovers[link-and-agent]",      # 722
    "tests/lab/test_faults.py::test_every_fault_kind_leaves_one_sync_point_and_recovers[disk-space-and-control-link]",  # 678
    "tests/lab/test_faults.py",                                                                   # 627
    "tests/lab/test_replication.py::test_mixed_group_is_cut_at_one_instant_over_six_syncs",      # 597
    "tests/lab/test_dr.py::test_planned_migration_with_a_backup_crash_in_recover_never_goes_full",  # 537
    "tests/lab/test_dr.py::test_power_cut_mid_sync_failover_recover_keeps_the_primarys_writes_then_restore",  # 506
    "tests/lab/test_replication.py::test_two_links_carry_the_data_and_one_lost_mid_sync_is_an_alert_not_a_failure",  # 475
    "tests/lab/test_replication.py::test_link_cut_mid_sync_rolls_back_then_delta_after_link_up",  # 295
    "tests/lab/test_vagrant_lab.py::test_vagrant_lab_boots_both_vms_replicates_through_vagrant_ssh_and_destroys_them",
    "tests/lab/test_admin.py",                                                                    # 243
    "tests/lab/test_integrity.py::test_a_full_resync_cut_by_the_link_rolls_the_thick_secondary_back_exactly",  # 221
    "tests/lab/test_replication.py::test_a_sync_with_nothing_written_confirms_the_sync_point_and_any_write_makes_a_new_one",  # 211
    "tests/lab/test_security.py::test_only_the_primary_of_the_session_reaches_the_export",       # 177
    "tests/lab/test_replication.py::test_deleted_or_overflowed_base_makes_the_next_sync_full_and_status_says_why",  # 158
    "tests/lab/test_integrity.py",                                                                # 125-146 each
    "tests/lab/test_replication.py",                                                              # 108-128 each
    "tests/lab/test_security.py",                                                                 # 111-122 each
    "tests/lab/test_changes.py::test_group_cut_is_crash_consistent",                             # 70-94 each
    "tests/lab/test_lab_smoke.py::test_crash_and_start_keep_the_backups_lvs_and_their_data",     # 60
    "tests/lab/test_snapshots.py::test_backend_cut_find_delete_are_idempotent",                  # 27-39 each
    "tests/lab/test_changes.py",
)


def _lab_rank(nodeid: str) -> int:
    """Position in LAB_LONGEST_FIRST of the first entry naming the test (or its file); after them all else."""
    test = nodeid.split("[", 1)[0]
    for i, entry in enumerate(LAB_LONGEST_FIRST):
        if nodeid == entry or test == entry or test.startswith(entry + "::"):
            return i
    return len(LAB_LONGEST_FIRST)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None   # xdist's own scheduler
    from xdist.scheduler import LoadGroupScheduling

    class RcopyScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)   # an xdist_group, where pytest still lets xdist say so
            if scope == nodeid and not nodeid.startswith("tests/lab/"):
                return "unit"
            return scope

    return RcopyScheduling(config, log)


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_longest_first(config, items):   # a second hookimpl (specname)
    """On xdist workers under loadgroup: the lab tests longest first (a stable sort, the same on every
    worker, as xdist requires). xdist hands work units out in the order the workers collected them
    (the big "unit" unit first, then the lab tests one by one)."""
    if getattr(config.option, "loadgroup", False):
        items.sort(key=lambda item: _lab_rank(item.nodeid))


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("RCOPY_NO_LAB"):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("lab") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --- the xdist controller: stop every worker's lab at the end -----------------------------------------
_WORKERS: set[str] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodeready(node):
    _WORKERS.add(node.gateway.id)


def _down_lab(worker: str) -> None:
    if os.environ.get("RCOPY_LAB_KEEP"):
        return
    inst = lab_instance_dir(worker)
    if not inst.exists():
        return
    from rcopylab.config import load
    from rcopylab.labctl import Lab
    cfg = load({**os.environ, "RCOPY_LAB_DIR": str(inst)})
    forget_foreign_pidfiles(cfg)
    try:
        Lab(cfg, log=lambda msg: None).down()
    except Exception as e:   # noqa: BLE001 - cleanup: say so, never hide the run's own outcome
        print(f"rcopy: could not stop the lab {inst}: {type(e).__name__}: {e}", file=sys.stderr)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    if error:   # a crashed worker cannot stop its VMs; its replacement gets a new id and instance
        _down_lab(node.gateway.id)


def pytest_sessionfinish(session):
    """On the controller: every worker's VMs stopped (a worker's `lab` fixture normally did already)."""
    if hasattr(session.config, "workerinput"):
        return
    for worker in sorted(_WORKERS):
        _down_lab(worker)
