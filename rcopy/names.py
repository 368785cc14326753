"""The reserved snapshot name space: ``rcopy.<group>.<volume>.<kind><generation>`` (DESIGN.md).

Kinds: P primary resync snapshot (sync point n on the primary), R rollback snapshot of a secondary
while sync n+1 is in flight, F failover snapshot, K kept snapshot (writes of a demoted primary after
its last sync point). Group and volume names never contain '.', so a name parses back unambiguously
and a crashed run can be reconciled from what exists on disk.
"""
from __future__ import annotations

import dataclasses
import re

KINDS = "PRFK"
SNAPSHOT_RE = re.compile(
    r"^rcopy\.(?P<group>[A-Za-z0-9][A-Za-z0-9_+-]*)\.(?P<volume>[A-Za-z0-9][A-Za-z0-9_+-]*)"
    r"\.(?P<kind>[PRFK])(?P<generation>[1-9][0-9]*)$")


@dataclasses.dataclass(frozen=True)
class SnapName:
    group: str
    volume: str
    kind: str
    generation: int

    def __str__(self) -> str:
        return f"rcopy.{self.group}.{self.volume}.{self.kind}{self.generation}"


def snapshot_name(group: str, volume: str, kind: str, generation: int) -> str:
    if kind not in KINDS or generation < 1:
        raise ValueError(f"bad snapshot kind/generation {kind}{generation}")
    return str(SnapName(group, volume, kind, generation))


def parse(name: str) -> SnapName | None:
    """The parts of a reserved name, or None for a name rcopy does not own."""
    m = SNAPSHOT_RE.match(name)
    if not m:
        return None
    return SnapName(m["group"], m["volume"], m["kind"], int(m["generation"]))


def volume_name(path: str) -> str:
    """A volume's name inside reserved names: the device's (or file's) base name with '.' made '-'."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_+-]", "-", base).lstrip("-_+") or "vol"
    return name[:64]
