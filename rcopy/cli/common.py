"""What the noun modules share: the root check, the store, the peer, the driver, progress, output.

A sync from the CLI (or the daemon) is always: take the group lock (Busy if held), connect to the
target's agent, reconcile with it (DESIGN.md, crash windows), then run the sync point.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from rcopy import backends
from rcopy.daemon.scheduler import over_period_alert
from rcopy.engine.driver import Driver, SyncReport
from rcopy.engine.states import Event
from rcopy.errors import Busy, PermissionDenied
from rcopy.model import LinkState
from rcopy.state import Store

log = logging.getLogger("rcopy")


def require_root():
    """rcopy writes block devices and device-mapper tables: root only. RCOPY_ALLOW_NONROOT=1 is for tests."""
    if os.geteuid() != 0 and os.environ.get("RCOPY_ALLOW_NONROOT") != "1":
        raise PermissionDenied("rcopy must run as root (it snapshots and writes block devices): use sudo")


def open_store() -> Store:
    require_root()
    return Store()


def connect(store: Store, target_name: str):
    """A Peer on the first link that answers; records link states as seen."""
    from rcopy.transport.peer import Peer, TargetUnreachable

    target = store.target(target_name)
    try:
        peer = Peer(target, system=store.system().name)
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


def driver(store: Store, peer, progress=None) -> Driver:
    return Driver(store, peer, snapshotter_for=backends.snapshotter_for, changes_for=backends.changes_for,
                  full_extents=backends.full_extents, sender=backends.sender(), progress=progress)


def run_sync(store: Store, group: str, *, event: Event = Event.SYNC, full: str = "", progress=None,
             lock_held: bool = False) -> SyncReport:
    g = store.group(group)
    with (_nullctx() if lock_held else store.lock(group)):
        with connect(store, g.target) as peer:
            d = driver(store, peer, progress)
            d.reconcile(group)
            report = d.sync(group, event=event, full=full)
    g = store.group(group)
    alert = over_period_alert(g, g.last_sync_start, g.last_sync_end)
    if alert or g.alert:
        store.update_group(group, alert=alert)
        if alert:
            log.warning("group %s: %s", group, alert)
    return report


class _nullctx:
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
        fn()
        code = 0
    except BaseException:
        code = 1
    os._exit(code)


# -- progress -----------------------------------------------------------------------------------------
class LineProgress:
    """Plain lines for logs and pipes: one at start, every ``every`` seconds, one at the end of each volume."""

    def __init__(self, out=None, every: float = 5.0):
        self.out, self.every, self.last, self.total = out or sys.stdout, every, {}, {}

    def start(self, volume, total):
        self.total[volume], self.last[volume] = total, time.monotonic()
        print(f"{volume}: sending {total} bytes", file=self.out, flush=True)

    def update(self, volume, done):
        now = time.monotonic()
        if now - self.last.get(volume, 0) >= self.every:
            self.last[volume] = now
            total = self.total.get(volume) or 1
            print(f"{volume}: {100 * done // total}% ({done} of {total} bytes)", file=self.out, flush=True)

    def finish(self, volume, sent, reason):
        how = f"full sync: {reason}" if reason else "delta"
        print(f"{volume}: done, {sent} bytes sent ({how})", file=self.out, flush=True)


class BarProgress:
    """A tqdm bar per volume on a terminal."""

    def __init__(self):
        self.bars = {}

    def start(self, volume, total):
        from tqdm import tqdm
        self.bars[volume] = tqdm(total=total, desc=volume, unit="B", unit_scale=True, leave=True,
                                 position=len(self.bars))

    def update(self, volume, done):
        bar = self.bars.get(volume)
        if bar is not None:
            bar.update(max(0, done - bar.n))

    def finish(self, volume, sent, reason):
        bar = self.bars.pop(volume, None)
        if bar is not None:
            bar.update(max(0, bar.total - bar.n))
            bar.close()


def progress_for_terminal():
    return BarProgress() if sys.stdout.isatty() else LineProgress()


def print_report(report: SyncReport):
    full = [f"{v} ({why})" for v, (_, why) in report.volumes.items() if why]
    print(f"group {report.group}: sync point {report.generation} committed, {report.bytes_sent} bytes sent "
          f"in {report.seconds:.1f} s" + (f"; full: {', '.join(full)}" if full else ""))


def print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True))


def launch(store: Store, group: str, *, event: Event, full: str = "", wait: bool = False) -> int:
    """Run a sync point now: in the foreground with progress (``--wait``), or detached (3PAR's default)."""
    g = store.group(group)
    from rcopy.engine.states import transition
    # Refuse at once what the state does not allow. A sync in flight is judged by the lock (taken next),
    # not by the record: a record without a lock holder is a crashed sync that reconcile will settle.
    transition(dataclasses.replace(g, pending_generation=0), event)
    if wait:
        print_report(run_sync(store, group, event=event, full=full, progress=progress_for_terminal()))
        return 0
    directory = store.dir
    background(store, group, lambda: run_sync(Store(directory), group, event=event, full=full, lock_held=True))
    print(f"group {group}: sync point {g.generation + 1} started; follow it with 'rcopy status groups {group}'")
    return 0
