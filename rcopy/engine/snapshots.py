"""Two things every side does with Snapshotters, written once: cut requests grouped by back-end, and
delete-by-name that tolerates a missing snapshot (both ends and the CLI use them)."""
from __future__ import annotations

from typing import Callable, Sequence

from rcopy.engine.ports import Snapshot, Snapshotter


def cut_by_backend(snapshotter_for: Callable[[str], Snapshotter],
                   requests: Sequence[tuple[str, str]]) -> list[Snapshot]:
    """One ``cut`` per back-end (each back-end's cut is one instant across its volumes).

    A group mixing back-ends (thin and thick) is cut once per back-end, one after the other: each set
    is crash-consistent, the two sets are a few milliseconds apart.
    """
    groups: dict[int, tuple[Snapshotter, list]] = {}
    for origin, name in requests:
        s = snapshotter_for(origin)
        groups.setdefault(id(s), (s, []))[1].append((origin, name))
    out: list[Snapshot] = []
    for snapper, reqs in groups.values():
        out += snapper.cut(reqs)
    return out


def delete_named(snapshotter_for: Callable[[str], Snapshotter], origin: str, name: str) -> bool:
    """Delete the snapshot ``name`` of ``origin`` if it exists; True if there was one."""
    snapper = snapshotter_for(origin)
    snap = snapper.find(origin, name)
    if snap is None:
        return False
    snapper.delete(snap)
    return True
