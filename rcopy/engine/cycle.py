"""The sync cycle as pure functions: what to do for a sync, an abort, a reconcile after a restart.

Inputs are model values plus facts looked up beforehand: on the primary whether each P(n) exists and is
usable, from the backup its view of the group (``PeerView``: its sync point and which secondaries it
holds at it, answered by the agent's ``status`` or ``begin``). Outputs are plans (lists of
rcopy.engine.plan actions): the plan decides delta or full for every volume, and the driver only
executes it, so ``rcopy sync --dry-run`` prints exactly what a sync does. Nothing here does I/O.
DESIGN.md explains the order.
"""
from __future__ import annotations

import dataclasses
import secrets

from rcopy.engine import plan as P
from rcopy.engine.roles import base_kind
from rcopy.names import snapshot_name
from rcopy.model import Group, VolumePair, VolumeState


def new_sync_id() -> str:
    return secrets.token_hex(8)


@dataclasses.dataclass(frozen=True)
class PeerView:
    """What the backup reports about a group (agent ops ``status`` and ``begin``)."""

    generation: int = 0
    sync_id: str = ""
    pending_generation: int = 0
    pending_id: str = ""
    exists: bool = True
    role: str = "secondary"
    volumes: dict = dataclasses.field(default_factory=dict)   # secondary path -> its volume state

    @classmethod
    def from_dict(cls, d: dict) -> "PeerView":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def holds(self, generation: int, sync_id: str, remote: str) -> bool:
        """Does the backup hold sync point (generation, sync_id) on secondary ``remote``? A delta is
        applied only then (design §4: a blind apply is how peers corrupt replicas)."""
        return (generation > 0 and self.generation == generation and self.sync_id == sync_id
                and self.volumes.get(remote) == VolumeState.SYNCED.value)


def _snap(g: Group, v: VolumePair, kind: str, generation: int) -> tuple[str, str, str]:
    return (v.backend, v.local, snapshot_name(g.name, v.name, kind, generation))


def base_snap(g: Group, v: VolumePair, generation: int) -> tuple[str, str, str]:
    """This side's base of sync point ``generation``: P(n), or F(n) where it took over at n."""
    return _snap(g, v, base_kind(g, generation), generation)


def bases(g: Group, volumes: list[VolumePair], generation: int) -> tuple[tuple[str, str, str], ...]:
    return tuple(base_snap(g, v, generation) for v in volumes)


def base_problem(g: Group, v: VolumePair, base_state: str | None, peer: PeerView, *, full: str = "") -> str:
    """Why volume ``v`` cannot be sent as a delta from P(n), or "" when it can.

    ``base_state``: None when P(n) exists and is usable here, else the words for what is wrong.
    """
    if full:
        return full
    if g.generation == 0:
        return "initial sync"
    if v.state in (VolumeState.NEW, VolumeState.NOT_SYNCED, VolumeState.FAILED, VolumeState.STALE) or not v.last_sync:
        return f"volume was {v.state.value}, not synced at sync point {g.generation}"
    if base_state:
        return base_state
    if not peer.holds(g.generation, g.sync_id, v.remote):
        if (peer.generation, peer.sync_id) == (g.generation, g.sync_id):
            return (f"the backup does not hold sync point {g.generation} on {v.remote}: it is "
                    f"{peer.volumes.get(v.remote, 'unknown')} there")
        return (f"the backup does not hold sync point {g.generation} on {v.remote} "
                f"(it holds {peer.generation or 'none'})")
    return ""


def plan_begin(g: Group, volumes: list[VolumePair], generation: int, sync_id: str) -> list[P.Action]:
    """The first steps of sync point ``generation``, up to the cut: the backup begins (R snapshots,
    exports) while the primary cuts, and its answer (PeerBegun) feeds plan_sync."""
    return [P.RecordBegin(g.name, generation, sync_id),
            P.PeerBegin(g.name, generation, sync_id, g.generation, g.sync_id, tuple(v.remote for v in volumes)),
            P.Cut(tuple(_snap(g, v, "P", generation) for v in volumes)),
            P.PeerBegun(g.name, generation)]


def plan_sync(g: Group, volumes: list[VolumePair], generation: int, sync_id: str,
              base_states: dict[str, str | None], peer: PeerView, *, full: str = "") -> list[P.Action]:
    """The whole plan of sync point ``generation`` (= g.generation + 1): design §2.3 steps (a)-(d).

    ``base_states`` maps volume name -> None (P(n) usable) or the reason it is not; ``peer`` is the
    backup's view. ``full`` forces a full sync of every volume with that reason (``sync --full``).
    """
    n = g.generation
    plan = plan_begin(g, volumes, generation, sync_id)
    for v in volumes:
        source = snapshot_name(g.name, v.name, "P", generation)
        if n == 0 and v.state is VolumeState.SYNCED and not full:
            plan.append(P.Send(v.name, v.local, v.remote, v.backend, v.size, source, None,
                               "admitted with --nosync", skip=True))
            continue
        why = base_problem(g, v, base_states.get(v.name), peer, full=full)
        base = None if why else base_snap(g, v, n)[2]
        plan.append(P.Send(v.name, v.local, v.remote, v.backend, v.size, source, base, why))
    plan += [P.PeerCommit(g.name, generation, sync_id), P.Commit(g.name, generation, sync_id)]
    if n:
        plan.append(P.DeleteSnapshots(bases(g, volumes, n)))
    return plan + [P.PeerTidied(g.name, generation)]


def may_confirm(g: Group, volumes: list[VolumePair], base_states: dict[str, str | None], peer: PeerView,
                *, full: str = "") -> bool:
    """Could sync point n stand for now if nothing was written since it was cut? Only where every volume
    would go as a delta (synced at n, usable base here, the backup holds n on it) and no ``full``."""
    return bool(volumes) and not full and g.generation > 0 and not g.pending_generation and all(
        base_problem(g, v, base_states.get(v.name), peer) == "" for v in volumes)


def plan_confirm(g: Group) -> list[P.Action]:
    """The plan when nothing was written since sync point n: confirm n current (one transaction)."""
    return [P.Confirm(g.name, g.generation, g.sync_id)]


def plan_abort(g: Group, volumes: list[VolumePair], generation: int, sync_id: str, reason: str,
               *, peer: bool = True, fault: str = "failed", marks: dict | None = None) -> list[P.Action]:
    """Undo an uncommitted sync: the backup rolls back (R(n) promoted), P(n+1) goes, P(n) stays.
    ``marks``: volume -> state it ends in (a read error: stale or not-synced) instead of its last one."""
    plan: list[P.Action] = [P.PeerAbort(g.name, generation, sync_id, reason)] if peer else []
    plan.append(P.DeleteSnapshots(tuple(_snap(g, v, "P", generation) for v in volumes)))
    plan.append(P.Abort(g.name, reason, fault, tuple(sorted((v, s.value) for v, s in (marks or {}).items()))))
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
                plan.append(P.DeleteSnapshots(bases(g, volumes, g.generation)))
            return plan
        reason = f"sync point {p} was interrupted (found in flight after a restart); the backup kept sync point {peer.generation}"
        return plan_abort(g, volumes, p, pid, reason, peer=bool(peer.pending_generation), fault="interrupted")
    if peer.pending_generation:
        plan.append(P.PeerAbort(g.name, peer.pending_generation, peer.pending_id,
                                "the primary has no sync in flight"))
    if g.generation > 1:
        plan.append(P.DeleteSnapshots(bases(g, volumes, g.generation - 1)))
    if g.generation and (peer.generation, peer.sync_id) != (g.generation, g.sync_id):
        plan.append(P.Note(f"the backup holds sync point {peer.generation} ({peer.sync_id or '-'}), not "
                           f"{g.generation} ({g.sync_id}): the next sync will be full"))
    return plan
