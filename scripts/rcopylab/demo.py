"""scripts/demo until the replication engine exists: the lab smoke scenario (scripts/rcopylab/smoke.py), narrated.

Boots (or reuses) the lab, runs each step on a clean lab, prints what each step showed, and stops the
VMs unless RCOPY_LAB_KEEP=1. Exit status 0 only if every step showed what it claims.
"""
from __future__ import annotations

import os
import sys
import time

import rcopy
from rcopylab import smoke
from rcopylab.labctl import Lab
from rcopy.errors import RcopyError


def _nbd(lab):
    smoke.export(lab)
    return smoke.nbd_write(lab)


def _link(lab):
    smoke.export(lab)
    return smoke.link_cut(lab)


STEPS = (
    ("names, ssh and rcopy in both VMs", lambda lab: smoke.peers(lab, rcopy.__version__)),
    ("snapshots on device-mapper", smoke.snapshots),
    ("NBD over the replication link", _nbd),
    ("link down and up", _link),
    ("power cut and restart of backup", smoke.crash_start),
)


def main() -> int:
    say = lambda msg: print(msg, flush=True)   # noqa: E731
    lab = Lab(log=say)
    t0 = time.monotonic()
    shown = []
    try:
        say("demo: booting the two-VM lab (primary, backup) with the working tree's rcopy installed")
        lab.ensure_up()
        for title, step in STEPS:
            say(f"\ndemo: {title} ...")
            lab.reset()
            shown.append(step(lab))
            say(str(shown[-1]))
    except RcopyError as e:
        say(f"demo: stopped: {e}")
        return e.exit_code
    finally:
        if not os.environ.get("RCOPY_LAB_KEEP"):
            lab.down()
    good = sum(s.ok for s in shown)
    say(f"\ndemo: {good} of {len(STEPS)} lab properties shown in {time.monotonic() - t0:.0f} s "
        f"(the replication engine's demo replaces this once it exists)")
    return 0 if good == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
