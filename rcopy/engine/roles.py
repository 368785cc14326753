"""Disaster recovery as pure rules: who may fail over, recover, restore or reverse a group, and what
the group becomes (3PAR ``setrcopygroup failover|recover|restore|reverse``).

Two words carry the whole scheme. A side *takes over* (becomes the source of the data) at its committed
sync point n: it snapshots its volumes as F(n), the base of its first sync, and makes them writable. A
side *steps down* (becomes the receiver) at the common sync point n: it keeps its volumes' present image
as K(n) (3PAR discards it), rolls them back to its own base of n, marks them as holding n and makes
them read-only. After that the ordinary sync cycle (rcopy.engine.cycle) runs in the new direction, with
its rollback points and its two-phase commit: so recover and restore are as crash-safe as any sync.

Roles: primary / secondary is the natural direction; after a failover the backup is primary-rev and the
natural primary, once recovered, secondary-rev. ``restore`` and ``reverse --current`` swap the
direction; ``reverse --natural`` only renames the roles.
"""
from __future__ import annotations

import dataclasses

from rcopy.errors import Busy, NotReady, WrongRole
from rcopy.model import Group, GroupState, Role

# the receiving role that faces each sending one
RECEIVER_OF = {Role.PRIMARY: Role.SECONDARY, Role.PRIMARY_REV: Role.SECONDARY_REV}
# failover: a receiver takes over, keeping the direction's labels
TAKEOVER = {Role.SECONDARY: Role.PRIMARY_REV, Role.SECONDARY_REV: Role.PRIMARY}
# restore and reverse --current: the direction turns, each side gets the other's role
SWAP = {Role.PRIMARY: Role.SECONDARY_REV, Role.SECONDARY_REV: Role.PRIMARY,
        Role.PRIMARY_REV: Role.SECONDARY, Role.SECONDARY: Role.PRIMARY_REV}
# reverse --natural: the present direction becomes the natural one
NATURAL = {Role.PRIMARY_REV: Role.PRIMARY, Role.SECONDARY_REV: Role.SECONDARY}


def base_kind(g: Group, generation: int) -> str:
    """The snapshot kind of this side's base for sync point ``generation``: F where it took over at
    that point (failover, reverse), P (the resync snapshot of a sync it sent) otherwise."""
    return "F" if generation and g.failover_point == generation else "P"


def _not_syncing(g: Group, what: str):
    if g.syncing:
        raise Busy(f"group {g.name} is syncing sync point {g.pending_generation}: wait for it, then {what}")


def check_failover(g: Group) -> None:
    if g.role not in TAKEOVER:
        raise WrongRole(f"group {g.name} is {g.role.value} on this system: failover runs on the backup "
                        "(the system where the group is secondary)")
    if g.generation == 0:
        raise NotReady(f"group {g.name} never completed a sync here: there is no consistent image to fail over to")


def took_over(g: Group, role: Role, *, kind: str = "F", state: GroupState = GroupState.STOPPED,
              reason: str = "") -> Group:
    """This side after taking over as the source at its sync point. With ``kind`` F its F(n) snapshots
    are the next sync's base (failover, reverse --current); with P (restore) its P(n) are."""
    return dataclasses.replace(g, role=role, state=state, reason=reason, fault="admin" if state is GroupState.STOPPED else "",
                               failover_point=g.generation if kind == "F" else 0, pending_generation=0, pending_id="")


def failover_reason(g: Group) -> str:
    return (f"failed over at sync point {g.generation}: this system serves the data; run "
            f"'rcopy group recover {g.name}' when {g.target} is back")


def fenced(g: Group, by: str) -> Group:
    """A natural primary whose backup failed over: stopped until recover (run on ``by``) demotes it."""
    return dataclasses.replace(g, state=GroupState.STOPPED, fault="failover",
                               reason=f"failed over to {by}: this side is fenced; its data since the last sync "
                                      f"point is kept when 'rcopy group recover {g.name}' runs on {by}")


def stepped_down(g: Group, role: Role, generation: int, sync_id: str) -> Group:
    return dataclasses.replace(g, role=role, state=GroupState.STOPPED, fault="", failover_point=0,
                               reason=f"receiving from {g.target}", generation=generation, sync_id=sync_id,
                               pending_generation=0, pending_id="")


def check_recover(g: Group) -> None:
    if not g.sends or not g.failover_point:
        raise WrongRole(f"group {g.name} is {g.role.value} on this system and did not fail over here: recover "
                        "runs on the system that failed over (role primary-rev)")
    _not_syncing(g, "recover")
    if g.generation > g.failover_point:
        raise NotReady(f"group {g.name} is recovered already (sync point {g.generation} was sent after the "
                       f"failover at {g.failover_point}): syncs run in reverse; 'rcopy group restore "
                       f"{g.name}' returns to the natural direction")


def check_restore(g: Group) -> None:
    if g.role is not Role.PRIMARY_REV:
        raise WrongRole(f"group {g.name} is {g.role.value} on this system: restore runs on the primary-rev side")
    _not_syncing(g, "restore")
    if g.failover_point and g.generation <= g.failover_point:
        raise NotReady(f"group {g.name} has not synced back since the failover: run 'rcopy group recover "
                       f"{g.name}' first")


def check_reverse(g: Group, how: str) -> Role:
    """The role this side gets from ``reverse --natural`` or ``--current``."""
    _not_syncing(g, "reverse it")
    if how == "natural":
        if g.role not in NATURAL:
            raise NotReady(f"group {g.name} is {g.role.value} here: its roles are natural already")
        return NATURAL[g.role]
    if g.state in (GroupState.STARTED, GroupState.STARTING):
        raise NotReady(f"group {g.name} is {g.state.value}: stop it first ('rcopy group stop {g.name}'); "
                       "reverse --current turns a stopped group only")
    if g.role in TAKEOVER and g.generation == 0:
        raise NotReady(f"group {g.name} never completed a sync: there is no common point to turn at")
    return SWAP[g.role]
