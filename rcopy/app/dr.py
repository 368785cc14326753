"""Disaster recovery on devices and peers: failover, recover, restore, reverse (rcopy.engine.roles
says who may and what a group becomes; this module does it).

Two local steps make every flow, each idempotent and durable at its end, so a crash anywhere is
finished by running the command again:

- ``take_over``: this side becomes the source at its committed sync point n. A sync in flight is
  rolled back first (R(n) promoted: the whole group at one point), F(n) of every volume is cut (the
  base of the first sync in the new direction; an existing complete F(n) is reused), the volumes
  become writable, the role changes (one transaction).
- ``step_down``: this side becomes the receiver at the common sync point n. Its volumes' present image
  is kept as K(n) (never deleted by rcopy), each volume is rolled back to its base of n and marked as
  holding n, read-only, then the role changes. A volume that cannot be rolled back (base gone) is
  marked not-synced: its next sync is full, with the reason.

Then the ordinary sync cycle runs in the new direction, with its rollback points and two-phase commit.
"""
from __future__ import annotations

import dataclasses
import logging

from rcopy import backends, faults
from rcopy.app import session
from rcopy.app.local import kept
from rcopy.engine import cycle, roles
from rcopy.engine.states import Event
from rcopy.errors import Busy, DeviceUnsafe, RcopyError, StateError
from rcopy.model import Group, GroupState, Role, VolumeState
from rcopy.state import Store

log = logging.getLogger("rcopy.dr")
LOCK_WAIT = 60.0        # a sync of the group that is failing (its peer took over) needs a moment to end


def _settle_receiver(store: Store, g: Group) -> Group:
    """A sync in flight on a receiving side is rolled back (its serving agent, if alive, is stopped);
    the tidy-up of a commit whose agent died is finished (a live agent's: the lock waits for it)."""
    if (g.pending_generation or g.tidy) and not g.sends:
        from rcopy.app.agent import Agent
        if g.pending_generation:
            Agent(store).settle_abandoned(g)
        else:
            Agent(store).rollback_abandoned(g)
    return store.group(g.name)


# -- the two local steps ------------------------------------------------------------------------------
def take_over(store: Store, group: str, *, role: Role, kind: str = "F", state: GroupState = GroupState.STOPPED,
              reason: str | None = None) -> Group:
    """``reason`` None: a failover's (what to run when the peer is back); restore hands over with ""."""
    g = _settle_receiver(store, store.group(group))
    if g.sends:
        if g.role is role and g.fault == "failover" and state is GroupState.STARTED:
            # an earlier restore handed over, and this side met the peer before it stepped down (and
            # fenced itself): the hand-over is what counts
            g = store.update_group(group, state=state, reason="", fault="")
        return g
    with store.lock(group, "the takeover", wait=LOCK_WAIT), session.lvm.reports():
        g = store.group(group)
        if g.pending_generation:            # a primary began a sync in between: let it end first
            raise Busy(f"group {group} began sync point {g.pending_generation} on {store.system().name} "
                       "meanwhile: retry")
        vols = store.volumes(group)
        backends.cut([cycle._snap(g, v, kind, g.generation) for v in vols])
        faults.point("dr-after-takeover-cut")
        backends.protect([(v.backend, v.local) for v in vols], writable=True)
        after = roles.took_over(g, role, kind=kind, state=state,
                                reason=roles.failover_reason(g) if reason is None else reason)
        store.put_group(after)
    log.log(logging.WARNING if after.reason else logging.INFO, "group %s: %s at sync point %s%s", group,
            role.value, g.generation, f" ({after.reason})" if after.reason else "")
    return after


def step_down(store: Store, group: str, *, role: Role, generation: int, sync_id: str, keep: bool = True,
              rollback: bool = True, force: bool = False) -> dict:
    """``keep``/``rollback`` off: the volumes are known to equal the base already (restore's sender,
    read-only since before its final cut)."""
    g = store.group(group)
    if not g.sends:
        return {"stepped_down": False, "kept": kept(store, g)}
    with store.lock(group, "the step-down", wait=LOCK_WAIT), session.lvm.reports():
        g = store.group(group)
        vols = store.volumes(group)
        if rollback and not force:
            busy = backends.busy(v.local for v in vols)
            if busy:
                raise DeviceUnsafe(f"group {group}: cannot roll back {busy[0]}: stop the applications on "
                                   f"{store.system().name} (unmount, close) and retry")
        g = _settle_sender(store, g, vols, generation, sync_id)
        n = g.generation
        common = n > 0 and (n, g.sync_id) == (generation, sync_id)
        if keep:
            backends.cut([cycle._snap(g, v, "K", max(n, 1)) for v in vols])
            faults.point("dr-after-keep-cut")
        mark = backends.mark_of(group, n, g.sync_id)
        marks = backends.marks([(v.backend, v.local) for v in vols], group)
        held: dict[str, bool] = {}
        for v in vols:
            synced = common and v.state is VolumeState.SYNCED and bool(v.last_sync)
            kind, origin, name = cycle.base_snap(g, v, n) if n else ("", "", "")
            base = backends.find(kind, origin, name) if synced else None
            if base is not None:
                if rollback:
                    backends.get(kind).snapshotter.rollback(base)     # consumes the base
                else:
                    backends.delete([(kind, origin, name)])
                backends.protect([(v.backend, v.local)], writable=False, group=group, mark=mark)
                held[v.name] = True
                faults.point("dr-after-one-rollback")
            else:      # rolled back by an interrupted earlier run (it carries the mark), or not at n
                held[v.name] = synced and marks.get(v.local) == mark
        backends.protect([(v.backend, v.local) for v in vols], writable=False)
        for v in vols:
            store.put_volume(dataclasses.replace(
                v, state=VolumeState.SYNCED if held[v.name] else VolumeState.NOT_SYNCED, bytes_done=0,
                full_reason="" if held[v.name] else f"not at the common sync point {generation} when it stepped down"))
        store.put_group(roles.stepped_down(g, role, n, g.sync_id))
        out = {"stepped_down": True, "kept": kept(store, store.group(group)),
               "not_held": sorted(v.local for v in vols if not held[v.name])}
    # a warning when data was set aside or a volume goes full; a clean hand-over (restore) is no news
    log.log(logging.WARNING if out["kept"] or out["not_held"] else logging.INFO,
            "group %s: %s of %s at sync point %s; kept %s%s", group, role.value, g.target, n, out["kept"] or "nothing",
            f"; not at the point: {', '.join(out['not_held'])}" if out["not_held"] else "")
    return out


def _settle_sender(store: Store, g: Group, vols, generation: int, sync_id: str) -> Group:
    """A sync this side had in flight: committed by the other side (it is the common point: commit it
    here too) or not (drop it)."""
    p = g.pending_generation
    if not p:
        return g
    if (p, g.pending_id) == (generation, sync_id):
        store.commit_sync(g.name, p, sync_id, state=g.state, reason=g.reason, fault=g.fault)
        if g.generation:
            backends.delete(cycle.bases(g, vols, g.generation))
    else:
        backends.delete([cycle._snap(g, v, "P", p) for v in vols])
        store.abort_sync(g.name, g.reason, state=None)
    return store.group(g.name)


def fence(store: Store, group: str, by: str) -> Group:
    g = store.group(group)
    if not g.sends:
        raise StateError(f"group {group} is {g.role.value} on {store.system().name}: nothing to fence")
    with store.lock(group, "the fence", wait=LOCK_WAIT):
        g = roles.fenced(store.group(group), by)
        store.put_group(g)
    return g


# -- the flows, run on the system the admin is on -----------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What a flow did, for the CLI to print."""

    group: Group
    lines: list[str]
    report: object = None


def failover(store: Store, group: str) -> Outcome:
    g = store.group(group)
    roles.check_failover(g)
    after = take_over(store, group, role=roles.TAKEOVER[g.role])
    lines = [f"group {group} failed over: {after.role.value} at sync point {after.generation}, volumes writable"]
    try:
        with session.connect(store, g.target) as peer:
            peer.call("fence", group=group, by=store.system().name)
        lines.append(f"{g.target} fenced: its group is stopped and sends nothing")
    except RcopyError as e:
        lines.append(f"{g.target} not fenced now ({e}); it fences itself when it next reaches this system, "
                     f"and recover demotes it")
    return Outcome(store.group(group), lines)


def recover(store: Store, group: str, *, force: bool = False, progress=None) -> Outcome:
    g = session.as_judged(store, group)           # a crashed recover's sync: the sync below reconciles it
    roles.check_recover(g)
    with store.lock(group, "recover"):
        with session.connect(store, g.target) as peer:
            res = peer.call("step_down", group=group, role=roles.RECEIVER_OF[g.role].value,
                            generation=g.generation, sync_id=g.sync_id, force=force)
        report = session.run_sync(store, group, event=Event.START, progress=progress, lock_held=True,
                                  confirm=False)
    lines = [f"{g.target} is {roles.RECEIVER_OF[g.role].value}: rolled back to sync point {g.generation}"]
    lines += [f"kept on {g.target}: {', '.join(n)} ({p})" for p, n in (res.get("kept") or {}).items()]
    return Outcome(store.group(group), lines, report)


def restore(store: Store, group: str, *, progress=None) -> Outcome:
    g = session.as_judged(store, group)
    roles.check_restore(g)
    with store.lock(group, "restore"):
        vols = store.volumes(group)
        busy = backends.busy(v.local for v in vols)
        if busy:
            raise DeviceUnsafe(f"group {group}: stop I/O on {store.system().name} first: {busy[0]}")
        with session.connect(store, g.target) as peer:
            view = cycle.PeerView.from_dict(peer.status(group))
        report = None
        if not (view.role == Role.PRIMARY.value and (view.generation, view.sync_id) == (g.generation, g.sync_id)):
            # (else an earlier restore handed over and died before this side stepped down: finish that)
            # no write may land after the final cut: the volumes stay read-only from here on
            backends.protect([(v.backend, v.local) for v in vols], writable=False)
            report = session.run_sync(store, group, event=Event.SYNC, progress=progress, lock_held=True,
                                      confirm=False)
            g = store.group(group)
        with session.connect(store, g.target) as peer:       # idempotent; lifts a fence it set on itself
            peer.call("take_over", group=group, role=roles.SWAP[roles.RECEIVER_OF[g.role]].value,
                      generation=g.generation, sync_id=g.sync_id, kind="P", state=GroupState.STARTED.value)
        faults.point("dr-after-handover")
    step_down(store, group, role=roles.SWAP[g.role], generation=g.generation, sync_id=g.sync_id,
              keep=False, rollback=False)
    store.update_group(group, state=GroupState.STARTED, reason="", fault="")
    return Outcome(store.group(group), [f"group {group} restored: {g.target} is primary again at sync point "
                                        f"{g.generation}; this system is secondary"], report)


def reverse(store: Store, group: str, how: str, *, local: bool = False, force: bool = False) -> Outcome:
    g = store.group(group)
    new = roles.check_reverse(g, how)
    where = "this system only" if local else f"here and on {g.target}"
    if how == "natural":
        with store.lock(group, "reverse"):
            store.update_group(group, role=new)
        if not local:
            with session.connect(store, g.target) as peer:
                peer.call("relabel", group=group)
        return Outcome(store.group(group), [f"group {group}: roles renamed ({where}); {new.value} here"])
    if g.sends:
        if not local:
            with session.connect(store, g.target) as peer:
                peer.call("take_over", group=group, role=roles.SWAP[roles.RECEIVER_OF[g.role]].value,
                          generation=g.generation, sync_id=g.sync_id, kind="F", state=GroupState.STOPPED.value)
        step_down(store, group, role=new, generation=g.generation, sync_id=g.sync_id, force=force)
    else:
        after = take_over(store, group, role=new, reason=f"reversed: this system sends to {g.target}")
        if not local:
            with session.connect(store, g.target) as peer:
                peer.call("step_down", group=group, role=roles.RECEIVER_OF[new].value,
                          generation=after.generation, sync_id=after.sync_id, force=force)
    return Outcome(store.group(group), [f"group {group}: direction reversed ({where}); {new.value} here, "
                                        "stopped: 'rcopy group start' resumes by delta"])


def relabel(store: Store, group: str) -> Group:
    g = store.group(group)
    if g.role in roles.NATURAL:
        with store.lock(group, "reverse --natural", wait=LOCK_WAIT):
            g = store.update_group(group, role=roles.NATURAL[g.role])
    return g

