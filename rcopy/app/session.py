"""A sync session as the product promises it: the one way the CLI and the daemon run a sync.

Always, in this order: take the group lock (Busy if held: never two syncs of a group), resume any
origin of the group left suspended (a cut killed by SIGKILL), connect to the target's agent, reconcile
with it (DESIGN.md, crash windows), run the sync point, record its report (seconds per phase, external
commands on each side, the executed plan). LVM questions inside a session are answered from one report
per VG (rcopy.sys.lvm.reports), and every command run is counted (rcopy.sys.run.ledger).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import syslog
import time

from rcopy import backends
from rcopy.app import alerts, devices
from rcopy.app.local import fill_kinds, resume_origins
from rcopy.app.reach import start
from rcopy.app.signals import unwind_on_signals
from rcopy.engine.driver import Driver, SyncReport
from rcopy.engine.states import Event, transition
from rcopy.errors import AuthFailed, Busy, RcopyError
from rcopy.model import Group, GroupState, LinkState
from rcopy.state import Store
from rcopy.sys import lvm, nbdkit, netlink, run, scratch

log = logging.getLogger("rcopy")


def connect(store: Store, target_name: str, started=None):
    """A Peer on the first link that answers (``started``: the one ``start`` began), links last seen
    down tried last; records link states as seen."""
    from rcopy.transport.peer import TargetUnreachable

    started = started or start(store, target_name)
    target = started.target
    try:
        peer = started.ready()
    except TargetUnreachable:
        for link in target.links:
            store.set_link_state(target.name, link, LinkState.DOWN)
        raise
    for link in target.links:
        if link == peer.link:
            store.set_link_state(target.name, link, LinkState.UP)
            break
        store.set_link_state(target.name, link, LinkState.DOWN)
    return peer


@contextlib.contextmanager
def stopping_on_failure(store: Store, group: str):
    """``stop_for`` what the set-up of a sync raises (local set-up, connect, reconcile)."""
    try:
        yield
    except RcopyError as e:
        stop_for(store, group, e)
        raise


def stop_for(store: Store, group: str, e: RcopyError) -> None:
    """A sync that failed before it began (set-up, connect, reconcile) on a link fault stops a running
    group as LINK_DOWN (auto_recover retries it once a link is back), on an identity ssh or the export
    refuses with fault "auth" (the administrator's to fix): recorded, since a detached sync has nobody
    to tell but the record. Anything else stops nothing: nothing began, and it may pass (a stale agent
    on the backup still letting go), so the next run asks again; a cause that records its own (a
    device gone, a fenced group) did so."""
    from rcopy.transport.peer import TargetUnreachable
    g = store.group(group)
    if g.state not in (GroupState.STARTED, GroupState.STARTING):
        return
    if e.kind == "link":
        reason = (f"target {g.target} unreachable: {e}" if isinstance(e, TargetUnreachable)
                  else f"the sync did not begin: {e}")
        store.put_group(transition(g, Event.LINK_DOWN, reason))
    elif isinstance(e, AuthFailed):
        store.put_group(transition(g, Event.SYNC_FAILED, str(e), fault="auth"))


def client_certificate(directory: str) -> tuple[str, str, str]:
    """This sync's throw-away client certificate (file, key file, PEM): the backup's export admits only
    its holder. Made per session and removed with it, like the export's own."""
    cert, key = os.path.join(directory, "client-cert.pem"), os.path.join(directory, "client-key.pem")
    return cert, key, nbdkit.make_certificate(cert, key, "rcopy-primary")


def record_data_links(store: Store, target_name: str, sender, peer=None) -> None:
    """What the sync found of its links: a link the sender lost, or the control channel moved off, is
    down (alert link_down; the sync went on over the others); a link that carried data, or carries the
    control channel now, is up. The sender names links by address, the target and the peer by the words
    the target was given (host names or IP literals)."""
    lost, used = getattr(sender, "lost_links", {}), getattr(sender, "used_links", set())
    control_lost = getattr(peer, "lost_links", {})
    if not (lost or control_lost or used):
        return
    for link in store.target(target_name).links:
        addresses = _addresses(link)
        if link in control_lost or addresses & set(lost):
            why = control_lost.get(link) or lost[next(iter(addresses & set(lost)))]
            what = "the control channel" if link in control_lost else "the data"
            log.warning("link %s to target %s lost during the sync (%s): %s went over the others",
                        link, target_name, why, what)
            store.set_link_state(target_name, link, LinkState.DOWN)
        elif addresses & used or (control_lost and link == getattr(peer, "link", None)):
            store.set_link_state(target_name, link, LinkState.UP)


def _addresses(link: str) -> set[str]:
    return {a.split("%")[0] for a in netlink.addresses(link)} or {link}


def driver(store: Store, peer, progress=None, *, link_timeout: float = 0) -> Driver:
    """The engine wired to LVM, dm and NBD. A data connection silent for the target's link timeout is
    a lost link, as the control channel's is, but never sooner than the NBD default: a busy backup
    disk may hold a write's reply for a while, and a short heartbeat is for the control channel."""
    from rcopy.transport.client import DEFAULT_TIMEOUT
    from rcopy.transport.sender import NbdSender
    return Driver(store, peer, backend=backends.get, cut=backends.cut, delete=backends.delete,
                  sender=NbdSender(timeout=max(DEFAULT_TIMEOUT, link_timeout)), progress=progress)


def check(store: Store, group: str, event: Event) -> Group:
    """Refuse at once what the group's state does not allow (before forking a background run). A sync
    in flight is judged by the lock, not by the record: a record without a lock holder is a crashed
    sync that reconcile settles. A volume whose device is gone or resized is refused here too."""
    transition(as_judged(store, group), event)
    g = store.group(group)
    if g.sends:
        devices.require(store, group, record=False)
    return g


def as_judged(store: Store, group: str) -> Group:
    """The group as a request is judged: a sync recorded in flight that no process holds is a crash
    that reconcile settles (rolled back: the group then counts as stopped, or finished)."""
    g = store.group(group)
    if g.pending_generation and not store.held(group):
        g = dataclasses.replace(g, pending_generation=0, pending_id="", state=GroupState.STOPPED)
    return g


def plan(store: Store, group: str, *, full: str = ""):
    """The plan a sync would run now (``rcopy sync --dry-run``): the same facts and function as a sync."""
    g = store.group(group)
    with lvm.reports(), connect(store, g.target) as peer:
        return driver(store, peer).plan(group, full=full)


def run_sync(store: Store, group: str, *, event: Event = Event.SYNC, full: str = "", progress=None,
             lock_held: bool = False, confirm: bool = True, started=None) -> SyncReport:
    """``started``: the Peer ``reach.start_early`` began for this group's target (closed on failure)."""
    g = store.group(group)
    d = None
    try:
        with (_Nothing() if lock_held else store.lock(group)), run.ledger() as book, lvm.reports(), \
                scratch.directory("client") as certs:
            t0 = time.monotonic()
            if started is not None and started.channel is not None:
                book.add(tuple(started.channel.argv))      # begun before this ledger (reach.start_early)
            started = started or start(store, g.target)   # ssh and the agent start while this host works
            try:
                with stopping_on_failure(store, group):
                    fill_kinds(store, group)
                    resume_origins(store, group)
                    lvm.prime(*(v.local for v in store.volumes(group)))
                    peer = connect(store, g.target, started)
            except BaseException:
                started.close()
                raise
            with peer:
                peer.certify = lambda: client_certificate(certs)     # made when begin needs it
                d = driver(store, peer, progress, link_timeout=peer.target.link_timeout)
                with stopping_on_failure(store, group):
                    d.reconcile(group)
                    devices.require(store, group)    # a volume gone or resized stops here, before any cut
                setup = time.monotonic() - t0        # connect, reconcile, device check: outside every phase
                report = d.sync(group, event=event, full=full, confirm=confirm)
        store.set_report(group, {**report.as_dict(), **book.as_dict(), "setup_seconds": round(setup, 3)})
        alerts.after_sync(store, group)
    finally:
        try:
            if d is not None:
                record_data_links(store, g.target, d.sender, d.peer)
            alerts.refresh(store)         # links seen down or up, volumes marked stale or synced again
        except RcopyError as e:           # never hides the sync's own outcome
            log.warning("group %s: alerts not refreshed: %s", group, e)
    return report


def settle_locked(store: Store, group: str) -> None:
    """``settle`` under the group's lock (Busy if someone holds it)."""
    with store.lock(group):
        settle(store, group)


def settle(store: Store, group: str) -> None:
    """Resume suspended origins and reconcile with the backup, without syncing (``group stop``)."""
    g = store.group(group)
    with lvm.reports():
        fill_kinds(store, group)
        resume_origins(store, group)
        if g.pending_generation:
            with connect(store, g.target) as peer:
                driver(store, peer).reconcile(group)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def background(store: Store, group: str, fn) -> int:
    """Run ``fn()`` in a detached child holding the group lock; return at once (3PAR: syncrcopy without -w)."""
    fd = store.try_lock(group)
    if fd is None:
        raise Busy(f"group {group} is busy (a sync or another operation is running): retry when it has finished")
    # HAZARD: an SQLite connection must not cross a fork: the parent closing it at exit can checkpoint
    # and remove the WAL under the child's open transaction, losing its commit. Close it first; the
    # child opens its own.
    store.close()
    pid = os.fork()
    if pid:
        os.close(fd)
        return pid
    try:                                        # the child: detach, keep the lock fd, never return
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(null, n)
        unwind_on_signals()
        fn()
        code = 0
    except BaseException as e:
        # Nobody reads this process's output: its failure goes to syslog (the record says why a
        # running group stopped; this also covers what stops nothing, such as a stopped group's sync).
        code = 1
        try:
            what = str(e) if isinstance(e, RcopyError) else f"{type(e).__name__}: {e}"
            alerts.to_syslog(syslog.LOG_ERR, f"detached sync of group {group} failed: {what}")
        except BaseException:
            pass
    os._exit(code)


def launch(store: Store, group: str, *, event: Event, full: str = "", progress=None,
           wait: bool = False, started=None) -> SyncReport | int:
    """Run a sync point now: in the foreground (``wait``: returns the report) or detached (3PAR's
    default: returns the child's pid). ``started``: see ``run_sync`` (foreground only; whoever began it
    closes it if this raises)."""
    check(store, group, event)
    if wait:
        return run_sync(store, group, event=event, full=full, progress=progress, started=started)
    directory = store.dir
    return background(store, group, lambda: run_sync(Store(directory), group, event=event, full=full,
                                                      lock_held=True))
