"""Executes the engine's plans through the ports: the only place where a sync actually happens.

The driver is handed everything (zrepl's driver over interfaces): the Store, a Peer (the backup's agent
over the control channel), ``backend(kind)`` giving each back-end's snapshotter, change source and full
scan, a ``cut`` across back-ends, and a Sender. It never imports rcopy.sys and never decides: the plan
(cycle.plan_sync, made after the backup answered ``begin``) says delta or full for every volume, and
the driver executes it. Order and crash windows are in DESIGN.md; the short version: record in flight
-> backup R(n) + exports -> ONE cut of P(n+1) -> send (up to 20 volumes at once, extents flowing lazily
from detection to the wire) -> backup commits (durable) -> we commit -> delete P(n). Any failure before
the backup's commit aborts: the backup promotes R(n), we delete P(n+1), the group is stopped with the
reason.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from rcopy import faults
from rcopy.engine import cycle
from rcopy.engine import plan as P
from rcopy.engine import roles
from rcopy.engine.ahead import Ahead
from rcopy.names import parse
from rcopy.ports import Backend, ExportInfo, Sender, Snapshot
from rcopy.engine.states import Event, transition
from rcopy.errors import AuthFailed, DeviceError, NoSpace, RcopyError, StateError, SyncFailed, WrongRole
from rcopy.extent import Extent
from rcopy.model import HEARTBEAT, Group, VolumePair, VolumeState

log = logging.getLogger("rcopy.engine")

MAX_IN_FLIGHT = 20          # volumes syncing at once per system (3PAR's figure)
_SLOTS = threading.BoundedSemaphore(MAX_IN_FLIGHT)   # shared by every group this process syncs
PHASES = ("begin", "cut", "send", "commit")


class Peer(Protocol):
    """The backup's agent, as the engine sees it (implemented by rcopy.transport.peer.Peer)."""

    link: str

    def status(self, group: str) -> dict: ...
    def begin_start(self, group: str, generation: int, sync_id: str, base_generation: int, base_id: str,
                    remotes: list[str], bind: str) -> Callable[[], dict]: ...
    def commit(self, group: str, generation: int, sync_id: str) -> dict: ...
    def abort(self, group: str, generation: int, sync_id: str, reason: str) -> dict: ...
    def ping(self) -> dict: ...
    def close(self) -> None: ...


class Progress(Protocol):
    """``update``: ``done`` bytes (data and zero runs) the backup acknowledged of ``total``, the bytes
    this volume's send writes (an estimate until its change scan ends; never below ``done``)."""
    def start(self, volume: str, total: int) -> None: ...
    def update(self, volume: str, done: int, total: int) -> None: ...
    def finish(self, volume: str, sent: int, reason: str) -> None: ...


class _Quiet:
    def start(self, volume, total): pass
    def update(self, volume, done, total): pass
    def finish(self, volume, sent, reason): pass


@dataclasses.dataclass
class SyncReport:
    group: str
    generation: int
    volumes: dict[str, tuple[int, str]]      # name -> (bytes sent, full reason or "")
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)   # PHASES -> seconds
    peer_commands: int | None = None         # external commands the backup ran for this sync
    peer_commands_by_tool: dict[str, int] = dataclasses.field(default_factory=dict)
    plan: list[str] = dataclasses.field(default_factory=list)           # the executed plan, rendered
    changed: dict[str, int] = dataclasses.field(default_factory=dict)   # name -> bytes changed (data + zeroes)
    confirmed: bool = False                  # nothing written since sync point n: n confirmed current
    peer_processes: int | None = None        # of peer_commands, the processes it started (LVM's shell starts none)

    @property
    def bytes_sent(self) -> int:
        return sum(b for b, _ in self.volumes.values())

    @property
    def bytes_changed(self) -> int:
        return sum(self.changed.values())

    def as_dict(self) -> dict:
        return {"generation": self.generation, "seconds": round(self.seconds, 3), "bytes_sent": self.bytes_sent,
                "bytes_changed": self.bytes_changed,
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "peer_commands": self.peer_commands,
                "peer_commands_by_tool": self.peer_commands_by_tool, "peer_processes": self.peer_processes,
                "volumes": {n: {"bytes_sent": b, "full_reason": r, "bytes_changed": self.changed.get(n, 0)}
                            for n, (b, r) in self.volumes.items()},
                "plan": self.plan, "confirmed": self.confirmed}


@dataclasses.dataclass
class _Run:
    """What a running plan learned so far."""

    exports: dict[str, ExportInfo] = dataclasses.field(default_factory=dict)   # remote -> export
    view: cycle.PeerView = dataclasses.field(default_factory=cycle.PeerView)   # the backup's facts
    snaps: dict[str, Snapshot] = dataclasses.field(default_factory=dict)       # name -> snapshot
    stats: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    changed: dict[str, int] = dataclasses.field(default_factory=dict)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    done: list[P.Action] = dataclasses.field(default_factory=list)
    peer_commands: int | None = None
    peer_commands_by_tool: dict[str, int] = dataclasses.field(default_factory=dict)
    peer_processes: int | None = None
    marks: dict[str, VolumeState] = dataclasses.field(default_factory=dict)    # volume -> state after an abort
    heartbeat: tuple[threading.Event, threading.Thread] | None = None
    begun: Callable[[], dict] | None = None          # waits for the backup's answer to PeerBegin
    begin: tuple = ()                                # PeerBegin's arguments (sent again after a move)
    tidied: Callable[[], dict] | None = None         # waits for the backup's tidy-up after its commit

    @property
    def in_flight(self) -> tuple[str, str]:
        """(group, sync id) of the sync the backup is serving, from begin's arguments."""
        return (self.begin[0], self.begin[2]) if self.begin else ("", "")

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - t0


class Driver:
    def __init__(self, store, peer: Peer, *, backend: Callable[[str], Backend],
                 cut: Callable[[Sequence[tuple[str, str, str]]], list[Snapshot]],
                 delete: Callable[[Iterable[tuple[str, str, str]]], int], sender: Sender,
                 progress: Progress | None = None, workers: int = MAX_IN_FLIGHT):
        self.store, self.peer = store, peer
        self.backend, self.cut, self.delete = backend, cut, delete
        self.sender = sender
        self.progress = progress or _Quiet()
        self.workers = max(1, min(workers, MAX_IN_FLIGHT))
        self._db_mutex = threading.Lock()
        self.view: cycle.PeerView | None = None   # the backup's, from a reconcile that changed nothing

    # -- planning -----------------------------------------------------------------------------------
    def base_states(self, g: Group, volumes: list[VolumePair]) -> dict[str, str | None]:
        """Per volume: None when P(n) exists and is usable, else why not (shown by status)."""
        out: dict[str, str | None] = {}
        if not g.generation:
            return out
        for v in volumes:
            _, _, name = cycle.base_snap(g, v, g.generation)
            snapper = self.backend(v.backend).snapshotter
            snap = snapper.find(v.local, name)
            if snap is None:
                out[v.name] = f"base snapshot {name} is missing"
            elif not snapper.valid(snap):
                out[v.name] = f"base snapshot {name} is no longer usable (overflowed or damaged)"
            else:
                out[v.name] = None
        return out

    def plan(self, name: str, *, full: str = "") -> list[P.Action]:
        """What a sync of ``name`` would do now: the same facts, the same function as ``sync``."""
        g, vols = self.store.group(name), self.store.volumes(name)
        view = cycle.PeerView.from_dict(self.peer.status(name))
        bases = self.base_states(g, vols)
        if cycle.may_confirm(g, vols, bases, view, full=full) and self.unchanged(g, vols):
            return cycle.plan_confirm(g)
        return cycle.plan_sync(g, vols, g.generation + 1, "<new id>", bases, view, full=full)

    def unchanged(self, g: Group, volumes: list[VolumePair]) -> bool:
        """Was nothing written to any volume since its base P(n) was cut? Asked of each back-end's change
        source (metadata only); any doubt, or an error, answers no and the sync runs as usual."""
        # the answers that cost no command first (a thick base's COW table is a read; a thin pool's
        # delta is a thin_delta): a volume found written ends the questions
        asked = sorted(((self.backend(v.backend), v) for v in volumes),
                       key=lambda bv: getattr(bv[0].changes, "check_commands", 1))
        for backend, v in asked:
            _, _, name = cycle.base_snap(g, v, g.generation)
            ask = getattr(backend.changes, "unchanged_since", None)
            base = backend.snapshotter.find(v.local, name)
            try:
                if ask is None or base is None or not ask(base, v.local):
                    return False
            except RcopyError as e:
                log.info("group %s: cannot tell whether %s changed (%s): syncing it", g.name, v.local, e)
                return False
        return True

    # -- reconcile ----------------------------------------------------------------------------------
    def reconcile(self, name: str) -> list[P.Action]:
        """Agree with the backup on the group's sync point before anything else (caller holds the lock).
        The control channel's link lost here (after hello, before begin) moves to another link, as it
        does mid-sync, and the question is asked again: asking twice settles nothing twice."""
        try:
            return self._reconcile(name)
        except RcopyError as e:
            if not self._move_channel(name, "", e):
                raise
        return self._reconcile(name)

    def _reconcile(self, name: str) -> list[P.Action]:
        g, vols = self.store.group(name), self.store.volumes(name)
        view = cycle.PeerView.from_dict(self.peer.status(name))
        fence = view.exists and view.role in ("primary", "primary-rev")
        if fence:
            # The backup took over (failover) while this side was away: settle our own record against
            # its committed point, but never ask it to roll anything back, and never send to it.
            view = dataclasses.replace(view, pending_generation=0, pending_id="")
        actions = cycle.reconcile(g, vols, view)
        self.execute(actions, _Run())
        # the backup's view is still current when reconcile settled nothing in flight (deleting an old
        # P(n-1) here, which it always asks, changes nothing there): the sync may use it
        settled = any(isinstance(a, (P.PeerAbort, P.Commit, P.Abort)) for a in actions)
        self.view = view if not fence and not settled else None
        if fence:
            g = roles.fenced(self.store.group(name), g.target)
            self.store.put_group(g)
            raise WrongRole(f"group {name}: {g.target} failed over and is the source now; this side is fenced "
                            f"until 'rcopy group recover {name}' runs on {g.target}")
        return actions

    # -- sync ---------------------------------------------------------------------------------------
    def sync(self, name: str, *, event: Event = Event.SYNC, full: str = "", confirm: bool = True) -> SyncReport:
        """One sync point, start to commit. The caller holds the group lock and has reconciled.
        ``confirm``: when nothing was written since sync point n, confirm n current instead (Confirm);
        disaster recovery's syncs, which hand the group over right after, always make a new point."""
        t0 = time.monotonic()
        g = transition(self.store.group(name), event)
        self.store.put_group(g)
        vols = self.store.volumes(name)
        if not vols:
            raise SyncFailed(f"group {name} has no volumes: admit some with 'rcopy group admit'")
        generation, sync_id = g.generation + 1, cycle.new_sync_id()
        run = _Run()
        with run.phase("check"):
            bases = self.base_states(g, vols)
            when = time.time()           # before the first question: the lag it gives is never too small
            quiet = (confirm and self.view is not None and cycle.may_confirm(g, vols, bases, self.view, full=full)
                     and self.unchanged(g, vols))
        if quiet:
            return self._confirm(g, when, t0, run)
        run.phases["begin"] = run.phases.pop("check")      # a sync reports its look at the bases as begin
        try:
            try:
                with run.phase("begin"):
                    self.execute(cycle.plan_begin(g, vols, generation, sync_id), run)
                run.phases["begin"] -= run.phases.get("cut", 0.0)    # the cut ran inside, reported apart
                actions = cycle.plan_sync(g, vols, generation, sync_id, bases, run.view, full=full)
                split = next(i for i, a in enumerate(actions) if isinstance(a, P.PeerCommit))
                self.execute(actions[len(run.done):split], run)
            finally:
                release = getattr(self.sender, "release", None)
                if release is not None:     # connections prepared for volumes that sent nothing
                    release()
                if run.heartbeat is not None:
                    run.heartbeat[0].set()
                    run.heartbeat[1].join()
        except (Exception, KeyboardInterrupt) as e:     # not SystemExit & co: a dying process aborts nothing
            reason = _reason(e, generation)
            if run.marks:
                reason += "; " + ", ".join(f"{v} marked {s.value}" for v, s in sorted(run.marks.items()))
            self._abort(g, vols, generation, sync_id, reason, fault=fault_of(e), marks=run.marks)
            if isinstance(e, RcopyError):
                raise sync_failed(f"group {name}: {reason}; the backup returns to sync point {g.generation}; "
                                  f"group stopped", e) from e
            raise
        with run.phase("commit"):
            try:
                self.execute(actions[split:split + 1], run)
            except (Exception, KeyboardInterrupt) as e:
                # The backup may or may not have committed: only asking it can tell. Keep everything (P(n),
                # P(n+1), the record in flight) and let the next run's reconcile finish or undo the commit.
                reason = (f"sync point {generation}: the backup's commit was not confirmed ({e}); "
                          "the next run reconciles with the backup")
                self.store.put_group(transition(self.store.group(name), Event.SYNC_FAILED, reason, fault_of(e)))
                raise sync_failed(f"group {name}: {reason}", e) from e
            self.execute(actions[split + 1:], run)
        return SyncReport(name, generation, run.stats, time.monotonic() - t0, run.phases, run.peer_commands,
                          run.peer_commands_by_tool, P.lines(run.done), run.changed,
                          peer_processes=run.peer_processes)

    def _confirm(self, g: Group, when: float, t0: float, run: _Run) -> SyncReport:
        """Nothing was written since sync point n: confirm it current as of ``when`` (plan_confirm)."""
        a = cycle.plan_confirm(g)[0]
        log.info("%s", a.describe())
        after = transition(self.store.group(g.name), Event.SYNC_DONE)
        self.store.confirm_sync(g.name, g.generation, g.sync_id, when=when,
                                started=time.time() - (time.monotonic() - t0),
                                state=after.state, reason=after.reason, fault=after.fault)
        run.done.append(a)
        vols = {v.name: (0, "") for v in self.store.volumes(g.name)}
        return SyncReport(g.name, g.generation, vols, time.monotonic() - t0, run.phases, None, {}, P.lines(run.done),
                          {v: 0 for v in vols}, confirmed=True)

    def _abort(self, g: Group, vols, generation: int, sync_id: str, reason: str, *, fault: str,
               marks: dict[str, VolumeState] | None = None):
        log.info("group %s: aborting sync point %s: %s", g.name, generation, reason)
        for a in cycle.plan_abort(g, vols, generation, sync_id, reason, fault=fault, marks=marks):
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
                    with run.phase("send"):
                        self._send_all(sends, run)
                    run.done += sends
                continue
            log.info("%s", a.describe())
            getattr(self, "_do_" + a.kind)(a, run)
            run.done.append(a)

    def _do_RecordBegin(self, a: P.RecordBegin, run):
        self.store.begin_sync(a.group, a.generation, a.sync_id)
        faults.point("after-record-begin")

    def _do_PeerBegin(self, a: P.PeerBegin, run):
        run.begin = (a.group, a.generation, a.sync_id, a.base_generation, a.base_id, list(a.remotes), self.peer.link)
        try:
            run.begun = self.peer.begin_start(*run.begin)
        except RcopyError as e:          # the channel died before the request could go
            run.begun = self._begin_again(run, e)

    def _do_PeerBegun(self, a: P.PeerBegun, run):
        try:
            res = run.begun()
        except RcopyError as e:
            res = self._begin_again(run, e)()
        run.view = cycle.PeerView.from_dict(res.get("view", {}))
        for remote, v in res["volumes"].items():
            run.exports[remote] = ExportInfo(**v["export"])
        prepare = getattr(self.sender, "prepare", None)
        if prepare is not None:         # the handshakes overlap what precedes each send (the change scan)
            prepare(run.exports.values())
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop, *run.in_flight), name="rcopy-heartbeat",
                                daemon=True)
        beat.start()
        run.heartbeat = (stop, beat)

    def _do_Cut(self, a: P.Cut, run):
        with run.phase("cut"):
            self.delete(a.requests)      # a leftover of an aborted attempt is older than "now": drop it
            when = time.time()           # just before the instant (the lag it gives is never too small)
            for snap in self.cut(a.requests):
                run.snaps[snap.name] = snap
        first = parse(a.requests[0][2]) if a.requests else None
        if first is not None:
            self.store.mark_cut(first.group, first.generation, when)
        faults.point("after-cut")

    def _send_all(self, sends: list[P.Send], run: _Run):
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="rcopy-send") as pool:
            # each worker runs in a copy of this context: the caller's command ledger counts its commands
            futures = {pool.submit(contextvars.copy_context().run, self._send_one, a, run): a for a in sends}
            for f in concurrent.futures.as_completed(futures):
                e = f.exception()
                if isinstance(e, RcopyError) and e.kind == "link":
                    # one volume lost the link: the others would only wait out their own timeouts
                    self._cancel_sends(f"another volume lost the link: {e}")
        failed = [(a, f.exception()) for f, a in futures.items() if f.exception()]
        for a, e in failed:
            if isinstance(e, DeviceError):
                # 3PAR: a read error marks the volume stale (a delta: its secondary is rolled back to a
                # point older than the group's next); a full sync leaves it not-synced
                run.marks[a.volume] = VolumeState.STALE if a.base else VolumeState.NOT_SYNCED
        if failed:
            failed.sort(key=lambda ae: not (isinstance(ae[1], RcopyError) and ae[1].kind == "link"))
            raise failed[0][1]

    def _cancel_sends(self, reason: str) -> None:
        cancel = getattr(self.sender, "cancel", None)
        if cancel is not None:
            cancel(reason)

    def _heartbeat(self, stop: threading.Event, group: str, sync_id: str):
        """Ping the agent from its begin until our commit or abort: it rolls back after a silence, and
        the cut and the sends (data goes over NBD, not the channel) can take long. The main thread makes
        no peer call meanwhile, so the channel is never used by two threads at once (nor while it is
        moved to another link here)."""
        while not stop.wait(HEARTBEAT):
            try:
                self.peer.ping()
            except RcopyError as e:
                # the control channel is the link's heartbeat (a ping unanswered for the target's link
                # timeout, or ssh's ServerAlive, ends it): move it to another link, or else fail the
                # sends now rather than after their own timeouts (a FLUSH may wait minutes)
                if self._move_channel(group, sync_id, e):
                    continue
                log.info("heartbeat to the backup failed: %s", e)
                self._cancel_sends(f"the backup stopped answering its heartbeat: {e}")
                return

    def _move_channel(self, group: str, sync_id: str, err: RcopyError, *, settled: bool = False) -> bool:
        """3PAR: one link lost is an alert, not a failure, whichever link it is. The sends on the links
        still up go on meanwhile; a data connection on the lost link fails over by its own timeout.
        ``settled``: a sync not in flight there (its begin lost in the link, or committed meanwhile)
        still gets the new channel."""
        reattach = getattr(self.peer, "reattach", None)
        if reattach is None or err.kind != "link" or len(getattr(self.peer.target, "links", ())) < 2:
            return False
        lost = self.peer.link
        try:
            link = reattach(group, sync_id, str(err), settled=settled)
        except RcopyError as e:
            log.warning("group %s: the control channel's link %s went silent (%s) and no other link took it "
                        "over: %s", group, lost, err, e)
            return False
        log.warning("group %s: the control channel's link %s went silent (%s); it moved to link %s and the "
                    "sync goes on", group, lost, err, link)
        return True

    def _begin_again(self, run: _Run, err: RcopyError):
        """Begin once more after the control channel's link went during it. Either the begin reached the
        agent (the moved channel attaches to the one serving the sync, which answers it again: begin is
        idempotent for the sync in flight) or it died in the link with ssh (nothing is in flight there:
        the agent over the new link serves it, bound to that link)."""
        if not self._move_channel(*run.in_flight, err, settled=True):
            raise err
        run.begin = (*run.begin[:6], self.peer.link)
        return self.peer.begin_start(*run.begin)

    def _send_one(self, a: P.Send, run: _Run):
        g = parse(a.source).group
        if a.skip:
            run.stats[a.volume] = (0, a.reason)
            self.progress.finish(a.volume, 0, a.reason)
            return
        backend = self.backend(a.backend)
        source = run.snaps.get(a.source)
        if source is None:
            raise SyncFailed(f"snapshot {a.source} of {a.origin} was not taken by the cut")
        if a.base:
            base = backend.snapshotter.find(a.origin, a.base)
            if base is None:
                raise SyncFailed(f"base snapshot {a.base} vanished during the sync: the next sync is full")
            # found on a thread of its own: the refine of the next candidates overlaps this send
            extents = Ahead(backend.changes.changed(base, source, remote=self._remote_digests(run, a)))
        else:
            extents = backend.full(source)
        flow = _Position(extents)
        self.progress.start(a.volume, a.size)
        last = [0.0]

        def progress(acked: int):
            # Progress is what the backup acknowledged, never what was read: the change scan and the
            # reads run ahead of the wire by up to the client's window (64 MiB in flight).
            total = max(flow.estimate(a.size), acked)
            self.progress.update(a.volume, acked, total)
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                with self._db_mutex:
                    self.store.progress(g, a.volume, acked, total)

        try:
            with _SLOTS:
                sent = self.sender.send(source.path, flow, run.exports[a.remote], progress=progress)
        finally:
            # a send that failed half-way leaves its change scan open on both snapshots (its file
            # descriptors live until the scan is closed): the abort could not remove P(n+1) then
            flow.close()
        faults.point("after-send")
        with self._db_mutex:
            self.store.progress(g, a.volume, flow.bytes, flow.bytes)
        run.stats[a.volume] = (sent, a.reason)
        run.changed[a.volume] = flow.bytes
        self.progress.finish(a.volume, sent, a.reason)

    def _remote_digests(self, run: _Run, a: P.Send):
        """What asks the backup for its digests of the volume's candidate blocks, so the refine reads
        only the new snapshot here (rcopy.changes.digest); None when the peer cannot answer them."""
        ask = getattr(self.peer, "digests", None)
        return None if ask is None else functools.partial(ask, *run.in_flight, a.remote)

    def _do_PeerCommit(self, a: P.PeerCommit, run):
        try:
            res = self.peer.commit(a.group, a.generation, a.sync_id) or {}
        except RcopyError as e:
            # the link went with the commit or its answer: ask again over another link (a commit is
            # idempotent; one the backup made is answered as made, one it never saw is made now)
            if not self._move_channel(a.group, a.sync_id, e, settled=True):
                raise
            res = self.peer.commit(a.group, a.generation, a.sync_id) or {}
        _count_peer(run, res)
        if res.get("tidy"):         # the backup tidies up now, while this side deletes its old snapshots
            try:
                run.tidied = self.peer.tidy(a.group)
            except RcopyError as e:       # the agent went between its answer and the request
                _tidy_lost(a, e)
        faults.point("after-peer-commit")

    def _do_PeerTidied(self, a: P.PeerTidied, run):
        if run.tidied is None:
            return
        try:
            _count_peer(run, run.tidied() or {})
        except RcopyError as e:
            _tidy_lost(a, e)

    def _do_Commit(self, a: P.Commit, run):
        after = transition(self.store.group(a.group), Event.SYNC_DONE)
        self.store.commit_sync(a.group, a.generation, a.sync_id, run.stats, state=after.state, reason=after.reason,
                               fault=after.fault)
        faults.point("after-commit")

    def _do_PeerAbort(self, a: P.PeerAbort, run):
        self.peer.abort(a.group, a.generation, a.sync_id, a.reason)

    def _do_Abort(self, a: P.Abort, run):
        after = transition(self.store.group(a.group), Event.LINK_DOWN if a.fault == "link" else Event.SYNC_FAILED,
                           a.reason, a.fault)
        self.store.abort_sync(a.group, after.reason, state=after.state, fault=after.fault,
                              marks={v: VolumeState(s) for v, s in a.marks})

    def _do_DeleteSnapshots(self, a: P.DeleteSnapshots, run):
        self.delete(a.requests)

    def _do_Note(self, a: P.Note, run):
        log.warning("%s", a.text)


class _Position:
    """Passes extents through lazily and remembers how far into the volume they reached and how many
    bytes they held (data and zero runs: the bytes changed), without materialising the list: a full
    sync of a large volume starts sending at once."""

    def __init__(self, extents: Iterable[Extent]):
        self._it: Iterator[Extent] = iter(extents)
        self.position = 0
        self.bytes = 0
        self.exhausted = False

    def __iter__(self):
        return self

    def __next__(self) -> Extent:
        try:
            e = next(self._it)
        except StopIteration:
            self.exhausted = True
            raise
        self.position = e.offset + e.length
        self.bytes += e.length
        return e

    def close(self) -> None:
        """Stop the extents' source (a change scan's reads and file descriptors), if it can be."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def estimate(self, size: int) -> int:
        """The bytes this send will write: exact once the extents ran out; before, what was found so
        far extrapolated over the rest of the volume (a full sync: the volume's size)."""
        if self.exhausted or self.position >= size:
            return self.bytes
        if not self.position:
            return size
        return max(self.bytes, self.bytes * size // self.position)


def _tidy_lost(a, e: RcopyError) -> None:
    """One warning whether the agent died before the tidy request or before its answer: a race."""
    log.warning("group %s: sync point %s is committed, but the backup's tidy-up did not answer (%s); "
                "it finishes it at its next start", a.group, a.generation, e)


def _count_peer(run: _Run, res: dict) -> None:
    """What the backup's answer says the sync cost there (a commit's, or its tidy-up's: the whole)."""
    if "commands" in res:
        run.peer_commands = res.get("commands")
        run.peer_commands_by_tool = res.get("commands_by_tool") or {}
        run.peer_processes = res.get("processes")


def fault_of(e: BaseException) -> str:
    """The policy type of what stopped a sync (rcopy.model.FAULTS)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, RcopyError):
        if e.kind == "link":
            return "link"
        if isinstance(e, DeviceError):
            return "device"
        if isinstance(e, NoSpace):
            return "space"
        if isinstance(e, AuthFailed):
            return "auth"
        if isinstance(e, StateError):
            return "state"
    return "failed"


def sync_failed(msg: str, cause: BaseException) -> SyncFailed:
    """The SyncFailed a failed sync ends in. Its exit code is 15, or the cause's when the cause is an
    AuthFailed (20): a refused identity is the administrator's to fix, and scripts must tell it apart."""
    err = SyncFailed(msg)
    if isinstance(cause, AuthFailed):
        err.exit_code = cause.exit_code
    return err


def _reason(e: BaseException, generation: int) -> str:
    if isinstance(e, RcopyError):
        what = "link lost" if e.kind == "link" else "failed"
        return f"sync point {generation} {what}: {e}"
    if isinstance(e, KeyboardInterrupt):
        return f"sync point {generation} interrupted (signal)"
    return f"sync point {generation} failed: {type(e).__name__}: {e}"
