"""This system's state as every rcopy run opens it: root only, the store, and the repairs that must come
before anything else reads it (origins an interrupted cut left suspended, back-ends of volumes admitted
before they were recorded). Light on imports: the agent and ``rcopy status`` start here, not in the
sync machinery (rcopy.app.session), which costs a second of imports under the lab's emulation."""
from __future__ import annotations

import dataclasses
import logging
import os

from rcopy import backends
from rcopy.errors import PermissionDenied
from rcopy.model import Group
from rcopy.state import Store
from rcopy.sys import dmsetup

log = logging.getLogger("rcopy")


def require_root():
    """rcopy writes block devices and device-mapper tables: root only. RCOPY_ALLOW_NONROOT=1 is for tests."""
    if os.geteuid() != 0 and os.environ.get("RCOPY_ALLOW_NONROOT") != "1":
        raise PermissionDenied("rcopy must run as root (it snapshots and writes block devices): use sudo")


def open_store() -> Store:
    """The state of this system, after resuming any origin an interrupted cut left suspended."""
    require_root()
    store = Store()
    resume_idle(store)
    return store


def resume_idle(store: Store) -> None:
    """Every rcopy start resumes the origins (or secondaries) of groups that nobody is syncing, found
    suspended: SIGKILL or a crash of rcopy itself mid-cut leaves them so, and suspended volumes hang
    their applications. A group whose lock is held is mid-cut for real and is left alone.

    HAZARD: the lock is taken only when sysfs shows a suspended volume (no command, no lock otherwise):
    a status that took every group's lock for a moment would make a sync starting at that instant
    fail with Busy (seen in the lab: a test polling status while its sync started)."""
    for g in store.groups():
        if not any(dmsetup.suspended_name(v.local) for v in store.volumes(g.name)):
            continue
        fd = store.try_lock(g.name)
        if fd is None:
            continue
        try:
            resume_origins(store, g.name)
        finally:
            os.close(fd)


def kept(store: Store, g: Group) -> dict[str, list[str]]:
    """path -> the F and K snapshots rcopy keeps for the administrator on that volume (``rcopy status``
    shows them; the DR flows report them)."""
    found = backends.kept([(v.backend, v.local, v.name) for v in store.volumes(g.name)], g.name)
    return {p: names for p, names in found.items() if names}


def fill_kinds(store: Store, group: str) -> None:
    """Volumes admitted before the back-end was stored with them (state schema 1) are probed once."""
    for v in store.volumes(group):
        if not v.backend:
            p = backends.probe(v.local)
            store.put_volume(dataclasses.replace(v, backend=p.kind, device_id=p.identity))


def resume_origins(store: Store, group: str) -> list[str]:
    """Resume every origin of the group found suspended (no command when none is)."""
    names = dmsetup.resume_suspended([v.local for v in store.volumes(group)])
    for n in names:
        log.warning("group %s: resumed %s, left suspended by an interrupted cut", group, n)
    return names
