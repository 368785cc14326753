"""The group cut: snapshot every volume of a group, whatever its back-end, at one instant.

Algorithm (DESIGN.md, "the cut"):

1. **Prepare**, outside any suspension, per back-end: remove leftovers of an interrupted cut, wait for
   merges, and (thin) pre-create each snapshot inactive so LVM has allocated its device id.
2. ``dmsetup suspend`` every origin of the group, thin and thick, one after the other. Suspend waits
   for in-flight I/O, flushes (freezing a filesystem on it) and queues new I/O.
3. **Take**, inside that one suspension: thin snapshots by pool messages (``delete ID`` +
   ``create_snap ID ORIGIN``), thick ones by ``lvcreate -s`` (which finds its origin already
   suspended, loads the snapshot tables and resumes that origin once its snapshot exists).
4. Resume every origin still suspended, always (finally), even when a take failed.
5. **Finish** after the resume: activate the thin snapshots, wait for device nodes.

Why one instant: take W2 on B, issued only after W1 on A completed. If W2 is in B's snapshot it
completed before B's suspend, so W1 completed before the last suspend and hence (no origin completes a
write between its suspend and its snapshot, and every snapshot is taken after the LAST suspend) before
A's suspend: W1 is in A's snapshot. "W2 without W1" cannot be captured, across back-ends too.

The origins' state is the only thing a killed process can leave behind here: every rcopy run resumes
the origins of its groups that it finds suspended (``dmsetup.resume_suspended``), SIGTERM and SIGINT
unwind through the ``finally``. HAZARD: nothing but this module may suspend origins of a group.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

from rcopy import faults
from rcopy.ports import Snapshot
from rcopy.sys import dmsetup

log = logging.getLogger("rcopy.snapshot.cut")


@dataclasses.dataclass
class CutPart:
    """One back-end's share of a group cut, prepared: what to suspend, what to do inside, and after."""

    suspend: list[str]                              # dm names of the origins
    take: Callable[[], None]                        # runs while every origin of the group is suspended
    finish: Callable[[], list[Snapshot]]            # runs after the resume, returns the snapshots in order


def suspended(dm_names: Sequence[str], inside: Callable[[], None]) -> None:
    """Suspend every device in ``dm_names``, run ``inside``, resume all (always)."""
    done: list[str] = []
    try:
        for name in dict.fromkeys(dm_names):       # unique, in order
            dmsetup.suspend(name)
            done.append(name)
        faults.point("in-cut")
        inside()
    finally:
        errors = []
        for name in reversed(done):
            try:
                dmsetup.resume(name)
            except dmsetup.DmError as e:            # keep resuming the others, report after
                log.error("cannot resume %s after the cut: %s", name, e)
                errors.append(e)
        if errors:
            raise errors[0]


def group_cut(parts: Sequence[CutPart]) -> list[Snapshot]:
    """Run prepared parts as ONE cut; returns every part's snapshots, parts in order."""
    def inside():
        for p in parts:
            p.take()
    suspended([n for p in parts for n in p.suspend], inside)
    out: list[Snapshot] = []
    for p in parts:
        out += p.finish()
    return out


def take(shares, *, reuse: bool = True, idle: bool = False) -> list[Snapshot]:
    """One cut across ``shares`` — (Snapshotter, [(origin, name), ...]) per back-end — returning the
    snapshots in share order. With ``reuse``, a cut already complete (every snapshot of every share
    exists and is whole) is returned as it is: taking it again would move the sync point. ``idle``:
    nobody writes the origins (the backup's secondaries), so no suspension is needed."""
    if reuse:
        found = [s.existing(reqs) for s, reqs in shares]
        if all(f is not None for f in found):
            return [snap for f in found for snap in f]
    return group_cut([s.prepare(reqs, idle=idle) for s, reqs in shares])
