"""Executes the engine's plans through the ports: the only place where a sync actually happens.

The driver is handed everything (zrepl's driver over interfaces): the Store, a Peer (the backup's agent
over the control channel, rcopy.transport.peer), ``snapshotter_for(path)``, ``changes_for(snapshotter)``,
``full_extents(snapshot)`` and a Sender. It never imports rcopy.sys. Order and crash windows are in
DESIGN.md; the short version: record in flight -> backup R(n) + exports -> cut P(n+1) -> send (up to 20
volumes at once) -> backup commits (durable) -> we commit -> delete P(n). Any failure before the backup's
commit aborts: the backup promotes R(n), we delete P(n+1), the group is stopped with the reason.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Iterable, Protocol

from rcopy.engine import cycle
from rcopy.engine import plan as P
from rcopy.engine.names import parse, snapshot_name
from rcopy.engine.snapshots import cut_by_backend, delete_named
from rcopy.engine.ports import ChangeSource, ExportInfo, Sender, Snapshot, Snapshotter
from rcopy.engine.states import Event, transition
from rcopy.errors import RcopyError, SyncFailed
from rcopy.extent import Extent
from rcopy.model import Group, GroupState, VolumePair

log = logging.getLogger("rcopy.engine")

MAX_IN_FLIGHT = 20          # volumes syncing at once per system (3PAR's figure)
_SLOTS = threading.BoundedSemaphore(MAX_IN_FLIGHT)   # shared by every group this process syncs
HEARTBEAT = 5.0             # seconds between pings to the agent during the data phase


class Peer(Protocol):
    """The backup's agent, as the engine sees it (implemented by rcopy.transport.peer.Peer)."""

    link: str

    def status(self, group: str) -> dict: ...
    def begin(self, group: str, generation: int, sync_id: str, base_generation: int, base_id: str,
              remotes: list[str], bind: str) -> dict: ...
    def commit(self, group: str, generation: int, sync_id: str) -> dict: ...
    def abort(self, group: str, generation: int, sync_id: str, reason: str) -> dict: ...
    def ping(self) -> dict: ...
    def close(self) -> None: ...


class Progress(Protocol):
    def start(self, volume: str, total: int) -> None: ...
    def update(self, volume: str, done: int) -> None: ...
    def finish(self, volume: str, sent: int, reason: str) -> None: ...


class _Quiet:
    def start(self, volume, total): pass
    def update(self, volume, done): pass
    def finish(self, volume, sent, reason): pass


@dataclasses.dataclass
class SyncReport:
    group: str
    generation: int
    volumes: dict[str, tuple[int, str]]      # name -> (bytes sent, full reason or "")
    seconds: float

    @property
    def bytes_sent(self) -> int:
        return sum(b for b, _ in self.volumes.values())


def _fault(point: str):
    """Test hook: RCOPY_FAULT=<point> kills this process at that point (tests of the crash windows)."""
    if os.environ.get("RCOPY_FAULT") == point:
        log.warning("RCOPY_FAULT=%s: exiting here on purpose", point)
        os._exit(99)


@dataclasses.dataclass
class _Run:
    """What a running plan learned so far."""

    exports: dict[str, ExportInfo] = dataclasses.field(default_factory=dict)   # remote -> export
    base_ok: dict[str, bool] = dataclasses.field(default_factory=dict)         # remote -> backup holds base
    snaps: dict[str, Snapshot] = dataclasses.field(default_factory=dict)       # name -> snapshot
    stats: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    heartbeat: tuple[threading.Event, threading.Thread] | None = None


class Driver:
    def __init__(self, store, peer: Peer, *, snapshotter_for: Callable[[str], Snapshotter],
                 changes_for: Callable[[Snapshotter], ChangeSource],
                 full_extents: Callable[[Snapshot], Iterable[Extent]], sender: Sender,
                 progress: Progress | None = None, workers: int = MAX_IN_FLIGHT):
        self.store, self.peer = store, peer
        self.snapshotter_for, self.changes_for, self.full_extents = snapshotter_for, changes_for, full_extents
        self.sender = sender
        self.progress = progress or _Quiet()
        self.workers = max(1, min(workers, MAX_IN_FLIGHT))
        self._db_mutex = threading.Lock()

    # -- planning -----------------------------------------------------------------------------------
    def base_states(self, g: Group, volumes: list[VolumePair]) -> dict[str, str | None]:
        """Per volume: None when P(n) exists and is usable, else why not (shown by status)."""
        out: dict[str, str | None] = {}
        if not g.generation:
            return out
        for v in volumes:
            name = snapshot_name(g.name, v.name, "P", g.generation)
            snapper = self.snapshotter_for(v.local)
            snap = snapper.find(v.local, name)
            if snap is None:
                out[v.name] = f"base snapshot {name} is missing"
            elif not snapper.valid(snap):
                out[v.name] = f"base snapshot {name} is no longer usable (overflowed or damaged)"
            else:
                out[v.name] = None
        return out

    def plan(self, name: str, *, full: str = "") -> list[P.Action]:
        g, vols = self.store.group(name), self.store.volumes(name)
        return cycle.plan_sync(g, vols, g.generation + 1, "<new id>", self.base_states(g, vols), full=full)

    # -- reconcile ----------------------------------------------------------------------------------
    def reconcile(self, name: str) -> list[P.Action]:
        """Agree with the backup on the group's sync point before anything else (caller holds the lock)."""
        g, vols = self.store.group(name), self.store.volumes(name)
        view = cycle.PeerView.from_dict(self.peer.status(name))
        actions = cycle.reconcile(g, vols, view)
        self.execute(actions, _Run())
        return actions

    # -- sync ---------------------------------------------------------------------------------------
    def sync(self, name: str, *, event: Event = Event.SYNC, full: str = "") -> SyncReport:
        """One sync point, start to commit. The caller holds the group lock and has reconciled."""
        t0 = time.monotonic()
        g = self.store.group(name)
        g = transition(g, event)
        self.store.put_group(g)
        vols = self.store.volumes(name)
        if not vols:
            raise SyncFailed(f"group {name} has no volumes: admit some with 'rcopy group admit'")
        generation, sync_id = g.generation + 1, cycle.new_sync_id()
        actions = cycle.plan_sync(g, vols, generation, sync_id, self.base_states(g, vols), full=full)
        run = _Run()
        split = next(i for i, a in enumerate(actions) if isinstance(a, P.PeerCommit))
        try:
            try:
                self.execute(actions[:split], run)
            finally:
                if run.heartbeat is not None:
                    run.heartbeat[0].set()
                    run.heartbeat[1].join()
        except (Exception, KeyboardInterrupt) as e:     # not SystemExit & co: a dying process aborts nothing
            reason = _reason(e, generation)
            self._abort(g, vols, generation, sync_id, reason)
            if isinstance(e, RcopyError):
                raise SyncFailed(f"group {name}: {reason}; the backup returns to sync point {g.generation}; "
                                 f"group stopped") from e
            raise
        try:
            self.execute(actions[split:split + 1], run)
        except (Exception, KeyboardInterrupt) as e:
            # The backup may or may not have committed: only asking it can tell. Keep everything (P(n),
            # P(n+1), the record in flight) and let the next run's reconcile finish or undo the commit.
            reason = (f"sync point {generation}: the backup's commit was not confirmed ({e}); "
                      "the next run reconciles with the backup")
            self.store.update_group(name, state=GroupState.STOPPED, reason=reason)
            raise SyncFailed(f"group {name}: {reason}") from e
        self.execute(actions[split + 1:], run)
        return SyncReport(name, generation, run.stats, time.monotonic() - t0)

    def _abort(self, g: Group, vols, generation: int, sync_id: str, reason: str):
        log.info("group %s: aborting sync point %s: %s", g.name, generation, reason)
        for a in cycle.plan_abort(g, vols, generation, sync_id, reason):
            try:
                self.execute([a], _Run())
            except RcopyError as e:
                if isinstance(a, P.PeerAbort):
                    # The agent rolls back by itself when its stdin closes (or at its next start).
                    log.info("backup did not confirm the rollback (%s): closing the channel", e)
                    self.peer.close()
                else:
                    log.info("%s failed: %s", a.describe(), e)

    # -- execution ----------------------------------------------------------------------------------
    def execute(self, actions: list[P.Action], run: _Run):
        sends = [a for a in actions if isinstance(a, P.Send)]
        for a in actions:
            if isinstance(a, P.Send):
                if a is sends[0]:
                    self._send_all(sends, run)
                continue
            log.info("%s", a.describe())
            getattr(self, "_do_" + a.kind)(a, run)

    def _do_RecordBegin(self, a: P.RecordBegin, run):
        self.store.begin_sync(a.group, a.generation, a.sync_id)
        _fault("after-record-begin")

    def _do_PeerBegin(self, a: P.PeerBegin, run):
        res = self.peer.begin(a.group, a.generation, a.sync_id, a.base_generation, a.base_id,
                              list(a.remotes), self.peer.link)
        for remote, v in res["volumes"].items():
            run.exports[remote] = ExportInfo(**v["export"])
            run.base_ok[remote] = bool(v["base"])
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="rcopy-heartbeat", daemon=True)
        beat.start()
        run.heartbeat = (stop, beat)

    def _do_Cut(self, a: P.Cut, run):
        for origin, name in a.requests:         # a leftover of an aborted attempt is older than "now": drop it
            delete_named(self.snapshotter_for, origin, name)
        for snap in cut_by_backend(self.snapshotter_for, a.requests):
            run.snaps[snap.name] = snap
        _fault("after-cut")

    def _send_all(self, sends: list[P.Send], run: _Run):
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="rcopy-send") as pool:
            futures = [pool.submit(self._send_one, a, run) for a in sends]
            concurrent.futures.wait(futures)
            errors = [f.exception() for f in futures if f.exception()]
        if errors:
            errors.sort(key=lambda e: not (isinstance(e, RcopyError) and e.kind == "link"))
            raise errors[0]

    def _heartbeat(self, stop: threading.Event):
        """Ping the agent from its begin until our commit or abort: it rolls back after a silence, and
        the cut and the sends (data goes over NBD, not the channel) can take long. The main thread makes
        no peer call meanwhile, so the channel is never used by two threads at once."""
        while not stop.wait(HEARTBEAT):
            try:
                self.peer.ping()
            except RcopyError as e:              # the sends will fail on their own if the link is gone
                log.info("heartbeat to the backup failed: %s", e)
                return

    def _send_one(self, a: P.Send, run: _Run):
        g = parse(a.source).group
        if a.skip:
            run.stats[a.volume] = (0, a.reason)
            self.progress.finish(a.volume, 0, a.reason)
            return
        snapper = self.snapshotter_for(a.origin)
        source = run.snaps.get(a.source) or snapper.find(a.origin, a.source)
        if source is None:
            raise SyncFailed(f"snapshot {a.source} of {a.origin} vanished during the sync")
        reason, base = a.reason, None
        if a.base:
            base = snapper.find(a.origin, a.base)
            if base is None:
                reason = f"base snapshot {a.base} vanished"
            elif not run.base_ok.get(a.remote, False):
                reason = f"the backup does not hold the base sync point of {a.base}"
        if reason or base is None:
            extents = list(self.full_extents(source))
            reason = reason or "full sync"
        else:
            extents = list(self.changes_for(snapper).changed(base, source))
        total = sum(e.length for e in extents)
        self.progress.start(a.volume, total)
        last = [0.0]

        def progress(done: int):
            self.progress.update(a.volume, done)
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                with self._db_mutex:
                    self.store.progress(g, a.volume, done, total)

        with _SLOTS:
            sent = self.sender.send(source.path, extents, run.exports[a.remote], progress=progress)
        _fault("after-send")
        with self._db_mutex:
            self.store.progress(g, a.volume, total, total)
        run.stats[a.volume] = (sent, reason)
        self.progress.finish(a.volume, sent, reason)

    def _do_PeerCommit(self, a: P.PeerCommit, run):
        self.peer.commit(a.group, a.generation, a.sync_id)
        _fault("after-peer-commit")

    def _do_Commit(self, a: P.Commit, run):
        self.store.commit_sync(a.group, a.generation, a.sync_id, run.stats)
        _fault("after-commit")

    def _do_PeerAbort(self, a: P.PeerAbort, run):
        self.peer.abort(a.group, a.generation, a.sync_id, a.reason)

    def _do_Abort(self, a: P.Abort, run):
        self.store.abort_sync(a.group, a.reason)

    def _do_DeleteSnapshot(self, a: P.DeleteSnapshot, run):
        delete_named(self.snapshotter_for, a.origin, a.name)

    def _do_Note(self, a: P.Note, run):
        log.warning("%s", a.text)


def _reason(e: BaseException, generation: int) -> str:
    if isinstance(e, RcopyError):
        what = "link lost" if e.kind == "link" else "failed"
        return f"sync point {generation} {what}: {e}"
    if isinstance(e, KeyboardInterrupt):
        return f"sync point {generation} interrupted by the administrator"
    return f"sync point {generation} failed: {type(e).__name__}: {e}"
