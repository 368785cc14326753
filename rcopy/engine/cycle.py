"""The sync cycle as pure functions: what to do for a sync, an abort, a reconcile after a restart.

Inputs are model values plus facts the driver looked up (does P(n) exist and is it valid? what does
the peer hold?); outputs are plans (lists of rcopy.engine.plan actions). Nothing here does I/O, so every
rule of design.md §2.3-2.5 is a unit test (tests/unit/test_engine*.py). DESIGN.md explains the order.
"""
from __future__ import annotations

import dataclasses
import secrets

from rcopy.engine import plan as P
from rcopy.engine.names import snapshot_name
from rcopy.model import Group, VolumePair, VolumeState


def new_sync_id() -> str:
    return secrets.token_hex(8)


@dataclasses.dataclass(frozen=True)
class PeerView:
    """What the backup reports about a group (agent op ``status``)."""

    generation: int = 0
    sync_id: str = ""
    pending_generation: int = 0
    pending_id: str = ""
    exists: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "PeerView":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def base_problem(g: Group, v: VolumePair, base_state: str | None, *, full: str = "") -> str:
    """Why volume ``v`` cannot be sent as a delta from P(n), or "" when it can.

    ``base_state``: None when P(n) exists and is usable, else the driver's words for what is wrong.
    """
    if full:
        return full
    if g.generation == 0:
        return "initial sync"
    if v.state in (VolumeState.NEW, VolumeState.NOT_SYNCED, VolumeState.FAILED, VolumeState.STALE) or not v.last_sync:
        return f"volume was {v.state.value}, not synced at sync point {g.generation}"
    return base_state or ""


def plan_sync(g: Group, volumes: list[VolumePair], generation: int, sync_id: str,
              base_states: dict[str, str | None], *, full: str = "") -> list[P.Action]:
    """The plan of sync point ``generation`` (= g.generation + 1): design.md §2.3 steps (a)-(d).

    ``base_states`` maps volume name -> None (P(n) usable) or the reason it is not. ``full`` forces a
    full sync of every volume with that reason (``rcopy sync --full``).
    """
    n = g.generation
    plan: list[P.Action] = [
        P.RecordBegin(g.name, generation, sync_id),
        P.PeerBegin(g.name, generation, sync_id, n, g.sync_id, tuple(v.remote for v in volumes)),
        P.Cut(tuple((v.local, snapshot_name(g.name, v.name, "P", generation)) for v in volumes)),
    ]
    for v in volumes:
        source = snapshot_name(g.name, v.name, "P", generation)
        if n == 0 and v.state is VolumeState.SYNCED and not full:
            plan.append(P.Send(v.name, v.local, v.remote, source, None, "admitted with --nosync", skip=True))
            continue
        why = base_problem(g, v, base_states.get(v.name), full=full)
        base = None if why else snapshot_name(g.name, v.name, "P", n)
        plan.append(P.Send(v.name, v.local, v.remote, source, base, why))
    plan += [P.PeerCommit(g.name, generation, sync_id), P.Commit(g.name, generation, sync_id)]
    if n:
        plan += [P.DeleteSnapshot(v.local, snapshot_name(g.name, v.name, "P", n)) for v in volumes]
    return plan


def plan_abort(g: Group, volumes: list[VolumePair], generation: int, sync_id: str, reason: str,
               *, peer: bool = True) -> list[P.Action]:
    """Undo an uncommitted sync: the backup rolls back (R(n) promoted), P(n+1) goes, P(n) stays."""
    plan: list[P.Action] = [P.PeerAbort(g.name, generation, sync_id, reason)] if peer else []
    plan += [P.DeleteSnapshot(v.local, snapshot_name(g.name, v.name, "P", generation)) for v in volumes]
    plan.append(P.Abort(g.name, reason))
    return plan


def reconcile(g: Group, volumes: list[VolumePair], peer: PeerView) -> list[P.Action]:
    """After a restart, before anything else: make this primary agree with what the backup committed.

    The two-phase commit writes the backup first, so the crash windows are (DESIGN.md):
    1. local in flight n+1, backup did not commit it -> abort (backup rolls back, drop P(n+1)).
    2. local in flight n+1, backup committed n+1 with the same id -> finish: commit here, drop P(n).
    3. nothing in flight here, backup still has one (its agent died with it) -> tell it to roll back.
    4. local committed n+1, old P(n) maybe left -> delete it (idempotent).
    """
    plan: list[P.Action] = []
    if g.pending_generation:
        p, pid = g.pending_generation, g.pending_id
        if peer.generation == p and peer.sync_id == pid:
            plan.append(P.Commit(g.name, p, pid))
            if g.generation:
                plan += [P.DeleteSnapshot(v.local, snapshot_name(g.name, v.name, "P", g.generation)) for v in volumes]
            return plan
        reason = f"sync point {p} was interrupted (found in flight after a restart); the backup kept sync point {peer.generation}"
        return plan_abort(g, volumes, p, pid, reason, peer=bool(peer.pending_generation))
    if peer.pending_generation:
        plan.append(P.PeerAbort(g.name, peer.pending_generation, peer.pending_id,
                                "the primary has no sync in flight"))
    if g.generation > 1:
        plan += [P.DeleteSnapshot(v.local, snapshot_name(g.name, v.name, "P", g.generation - 1)) for v in volumes]
    if g.generation and (peer.generation, peer.sync_id) != (g.generation, g.sync_id):
        plan.append(P.Note(f"the backup holds sync point {peer.generation} ({peer.sync_id or '-'}), not "
                           f"{g.generation} ({g.sync_id}): the next sync will be full"))
    return plan
