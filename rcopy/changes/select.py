"""Pick the change source for a snapshot back-end: thin and cow read metadata then refine; anything
else (the file simulator) compares the two snapshots whole."""
from __future__ import annotations

from typing import Iterator

from rcopy.changes.refine import full_compare
from rcopy.engine.ports import ChangeSource, Snapshot
from rcopy.extent import Extent


class FullCompare:
    """Implements ChangeSource by reading both snapshots whole (no metadata)."""

    def changed(self, old: Snapshot, new: Snapshot, *, block_size: int = 4096) -> Iterator[Extent]:
        return full_compare(old.path, new.path, block_size=block_size)


def change_source_for(snapshot_backend) -> ChangeSource:
    """``snapshot_backend``: a back-end name ("thin", "cow", "file"), or a Snapshotter/Snapshot
    carrying ``backend``."""
    name = snapshot_backend if isinstance(snapshot_backend, str) else getattr(snapshot_backend, "backend", "")
    if name == "thin":
        from rcopy.changes.thin import ThinChanges
        return ThinChanges()
    if name == "cow":
        from rcopy.changes.cow import CowChanges
        return CowChanges()
    return FullCompare()
