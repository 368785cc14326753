"""Group state transitions, pure: (group, event) -> new group, or a typed refusal.

The table is the whole policy of which request is allowed in which state (3PAR ``startrcopygroup``,
``syncrcopy``, ``stoprcopygroup``, ``admitrcopyvv``); the driver persists the returned Group. Roles
primary-rev / secondary-rev (failover, recover: rcopy.engine.roles) reuse the same table: only a
primary side (primary or primary-rev) sends data, and a primary fenced by its backup's failover
(fault "failover") sends nothing until recover.
"""
from __future__ import annotations

import dataclasses
import enum

from rcopy.errors import Busy, Refused, WrongRole
from rcopy.model import Group, GroupState, Role

SENDING_ROLES = (Role.PRIMARY, Role.PRIMARY_REV)


class Event(str, enum.Enum):
    START = "start"            # admin: group start (initial sync or resume)
    SYNC = "sync"              # admin or scheduler: resync now
    SYNC_DONE = "sync-done"    # the sync point was committed on both systems
    SYNC_FAILED = "sync-failed"
    STOP = "stop"              # admin: group stop
    LINK_DOWN = "link-down"    # every link of the target is down past the timeout
    ADMIT = "admit"            # admin: add or remove a volume
    REMOVE = "remove"


def _refuse_role(g: Group, event: Event):
    if g.role not in SENDING_ROLES and event in (Event.START, Event.SYNC, Event.ADMIT, Event.STOP, Event.REMOVE):
        raise Refused(f"group {g.name} is {g.role.value} here: run '{event.value}' on the system where it is primary")


def transition(g: Group, event: Event, reason: str = "", fault: str = "failed") -> Group:
    """The group after ``event``; raises Refused/Busy when the event is not allowed now. ``fault``
    types a SYNC_FAILED for policy (rcopy.model.FAULTS); LINK_DOWN is always "link", STOP "admin"."""
    _refuse_role(g, event)
    s = g.state
    if g.fault == "failover" and event in (Event.START, Event.SYNC):
        raise WrongRole(f"group {g.name} is fenced: {g.reason}")
    if event in (Event.START, Event.SYNC):
        if g.syncing:
            raise Busy(f"group {g.name} is syncing sync point {g.pending_generation}: wait for it to finish")
        if event is Event.SYNC and s is GroupState.NEW:
            raise Refused(f"group {g.name} was never started: run 'rcopy group start {g.name}' first")
        if event is Event.START and s is GroupState.STARTED:
            raise Refused(f"group {g.name} is already started: use 'rcopy sync {g.name}' to resync now")
        return dataclasses.replace(g, state=GroupState.STARTING if g.generation == 0 else g.state)
    if event is Event.SYNC_DONE:
        return dataclasses.replace(g, state=GroupState.STARTED, reason="", fault="")
    if event is Event.LINK_DOWN:
        return dataclasses.replace(g, state=GroupState.STOPPED, reason=reason or event.value, fault="link")
    if event is Event.SYNC_FAILED:
        return dataclasses.replace(g, state=GroupState.STOPPED, reason=reason or event.value, fault=fault)
    if event is Event.STOP:
        if g.syncing:
            raise Busy(f"group {g.name} is syncing: wait for the sync to finish, then stop it")
        if s in (GroupState.STOPPED, GroupState.NEW):
            raise Refused(f"group {g.name} is already {s.value}")
        return dataclasses.replace(g, state=GroupState.STOPPED, reason=reason or "stopped by the administrator",
                                   fault="admin")
    if event in (Event.ADMIT, Event.REMOVE):
        if s in (GroupState.STARTED, GroupState.STARTING) or g.syncing:
            raise Refused(f"group {g.name} is {s.value}: stop it first ('rcopy group stop {g.name}')")
        return g
    raise ValueError(f"unknown event {event}")
