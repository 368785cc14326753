"""Reaching a target's agent: which link first, and starting it early.

Light on imports on purpose: ``rcopy sync --wait`` starts ssh and the backup's agent from here before it
imports the sync machinery (rcopy.app.session), so the login and the agent's start-up (~3 s in the TCG
lab) overlap this process's own start-up (~1 s of imports there) instead of following it.
"""
from __future__ import annotations

import dataclasses

from rcopy.model import LinkState


def ordered(store, target_name: str):
    """The target with its links last seen down last (each costs the ssh ConnectTimeout)."""
    target = store.target(target_name)
    down = {link.address for link in store.links(target_name) if link.state is LinkState.DOWN}
    return dataclasses.replace(target, links=tuple(sorted(target.links, key=lambda a: a in down)))


def start(store, target_name: str):
    """A Peer whose first link's agent is starting (ssh login, the agent's start-up): ``connect``
    reads its hello later, so the caller's own local work overlaps that."""
    from rcopy.transport.peer import Peer
    return Peer(ordered(store, target_name), system=store.system().name, wait=False)


def start_early(group: str):
    """``start`` for the target of ``group``, before anything else of a sync; None when the state does
    not name one (not root, no such group: the sync then says so in its own words)."""
    from rcopy.errors import RcopyError
    from rcopy.state import Store
    try:
        store = Store()
    except (RcopyError, OSError):
        return None
    try:
        return start(store, store.group(group).target)
    except (RcopyError, OSError):
        return None
    finally:
        store.close()
