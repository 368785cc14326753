"""The group cut: snapshot several origins at one instant T, crash-consistently across all of them.

Algorithm (design §3, "The cut"):

1. ``dmsetup suspend`` every origin, one after the other. Suspend waits for in-flight I/O, flushes
   (freezing a filesystem on it) and queues new I/O: an origin completes no write from its suspend
   until after its snapshot exists, and every snapshot is created after the last suspend. Take W2 on
   B, issued only after W1 on A completed. If W2 is in B's snapshot it completed before B's suspend,
   so W1 completed before the last suspend, hence (A completes nothing between its suspend and its
   snapshot) before A's suspend: W1 is in A's snapshot. "W2 without W1" cannot be captured.
2. Create every snapshot. For a thick origin (measured, LVM 2.03.16): lvcreate sees the origin
   "already suspended", skips its own suspend, loads the snapshot-origin/snapshot tables and resumes
   the origin once its snapshot exists — harmless, that origin's snapshot is taken. For a thin
   origin lvcreate cannot run inside the cut (it skips the pool messages too): rcopy.snapshot.thin
   re-takes pre-created snapshots with pool messages instead.
3. Resume every origin still suspended, always (finally), even when a create failed.

LVM runs with ignore_suspended_devices (rcopy.sys.lvm.LVM_CONFIG) so it never blocks reading a
suspended device. HAZARD: never let anything but this module suspend origins of a group being cut.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

from rcopy.sys import dmsetup

log = logging.getLogger("rcopy.snapshot.cut")
T = TypeVar("T")


def group_cut(dm_names: Sequence[str], create: Callable[[], T]) -> T:
    """Suspend every device in ``dm_names``, run ``create`` (which takes all snapshots), resume all."""
    suspended: list[str] = []
    try:
        for name in dict.fromkeys(dm_names):       # unique, in order
            dmsetup.suspend(name)
            suspended.append(name)
        return create()
    finally:
        errors = []
        for name in reversed(suspended):
            try:
                dmsetup.resume(name)
            except dmsetup.DmError as e:            # keep resuming the others, report after
                log.error("cannot resume %s after the cut: %s", name, e)
                errors.append(e)
        if errors:
            raise errors[0]
