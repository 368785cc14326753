"""Actions the engine emits, as data: a plan is an ordered list that changes nothing until a driver runs it.

``rcopy sync --dry-run`` prints a plan; unit tests compare plans as lists (blivet's DeviceAction). Each
action says in one line what it will do (``describe``). The driver (driver.py) is the only code that
executes them.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Action:
    def describe(self) -> str:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class RecordBegin(Action):
    """Durably record sync point ``generation`` as in flight on this system (before anything else)."""
    group: str
    generation: int
    sync_id: str

    def describe(self):
        return f"record sync point {self.generation} of {self.group} as in flight"


@dataclasses.dataclass(frozen=True)
class PeerBegin(Action):
    """Backup: record the sync in flight, take R(n) of every synced secondary, export the secondaries."""
    group: str
    generation: int
    sync_id: str
    base_generation: int
    base_id: str
    remotes: tuple[str, ...]

    def describe(self):
        return (f"backup: snapshot synced secondaries as R{self.base_generation}, export "
                f"{len(self.remotes)} secondaries for sync point {self.generation}")


@dataclasses.dataclass(frozen=True)
class PeerBegun(Action):
    """Wait for the backup's answer to PeerBegin (sent before the cut: the two sides work at once)."""
    group: str
    generation: int

    def describe(self):
        return f"backup: answers that sync point {self.generation} is in flight and its exports are up"


@dataclasses.dataclass(frozen=True)
class Cut(Action):
    """Snapshot every primary volume at one instant, thin and thick in one suspension."""
    requests: tuple[tuple[str, str, str], ...]   # (back-end, origin path, snapshot name)

    def describe(self):
        return "cut (one instant): " + ", ".join(f"{o} -> {n} ({b})" for b, o, n in self.requests)


@dataclasses.dataclass(frozen=True)
class Send(Action):
    """Send one volume: the changes base -> source (delta) or all of source (full), or nothing (skip)."""
    volume: str
    origin: str
    remote: str
    backend: str                # thin, cow or file: chosen at admit
    size: int
    source: str                 # snapshot name of P(n+1)
    base: str | None            # snapshot name of P(n); None: full
    reason: str = ""            # why full (or why skipped)
    skip: bool = False

    def describe(self):
        if self.skip:
            return f"{self.volume}: nothing to send ({self.reason})"
        if self.base:
            return f"{self.volume}: send blocks changed between {self.base} and {self.source} to {self.remote}"
        return f"{self.volume}: full sync of {self.source} to {self.remote} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class PeerCommit(Action):
    group: str
    generation: int
    sync_id: str

    def describe(self):
        return (f"backup: flush and durably commit sync point {self.generation}, then delete its R snapshots "
                f"and mark the secondaries read-only while this side goes on")


@dataclasses.dataclass(frozen=True)
class Commit(Action):
    group: str
    generation: int
    sync_id: str

    def describe(self):
        return f"commit sync point {self.generation} of {self.group} here"


@dataclasses.dataclass(frozen=True)
class PeerTidied(Action):
    """Wait for the backup's tidy-up that PeerCommit started (it overlaps this side's own): the sync
    is committed either way, so a failure here is a warning, and the backup retries it."""
    group: str
    generation: int

    def describe(self):
        return f"backup: answers that its tidy-up after sync point {self.generation} is done"


@dataclasses.dataclass(frozen=True)
class Confirm(Action):
    """Nothing was written to any volume since sync point ``generation`` was cut (the change sources
    know it from metadata): the backup's image is the group's image now, so that sync point is
    confirmed current, without a snapshot, a send, or a new sync point."""
    group: str
    generation: int
    sync_id: str

    def describe(self):
        return (f"nothing written to any volume since sync point {self.generation} was cut: confirm it "
                f"current (no snapshot, nothing to send)")


@dataclasses.dataclass(frozen=True)
class PeerAbort(Action):
    group: str
    generation: int
    sync_id: str
    reason: str

    def describe(self):
        return f"backup: promote the R snapshots back onto the secondaries, forget sync point {self.generation}"


@dataclasses.dataclass(frozen=True)
class Abort(Action):
    group: str
    reason: str
    fault: str = "failed"       # typed cause for policy (rcopy.model.FAULTS): auto_recover retries link
    marks: tuple[tuple[str, str], ...] = ()   # (volume, state) a read error left it in: stale, not-synced

    def describe(self):
        return f"forget the sync in flight of {self.group}, stop it: {self.reason}"


@dataclasses.dataclass(frozen=True)
class DeleteSnapshots(Action):
    """Delete snapshots that exist (missing ones are skipped), batched per back-end."""
    requests: tuple[tuple[str, str, str], ...]   # (back-end, origin path, snapshot name)

    def describe(self):
        return "delete (if they exist): " + ", ".join(n for _, _, n in self.requests)


@dataclasses.dataclass(frozen=True)
class Note(Action):
    """Nothing to execute: a fact the plan wants shown (e.g. reconcile found the peer diverged)."""
    text: str

    def describe(self):
        return self.text


def lines(plan: list[Action]) -> list[str]:
    return [f"{i}. {a.describe()}" for i, a in enumerate(plan, 1)]


def render(plan: list[Action]) -> str:
    return "\n".join(lines(plan))
