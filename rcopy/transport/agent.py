"""The backup's end of the control channel: ``rcopy agent`` serves JSON-lines RPC on stdin/stdout.

One request per line ``{"id": N, "op": OP, "args": {...}}``; one reply per line, ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": {"class", "exit_code", "message"}}`` (peer.py).
Operations (all idempotent where a retry can happen):

- ``hello {protocol, peer}`` -> ``{system, protocol, version}``
- ``status {group}`` -> ``{exists, generation, sync_id, pending_generation, pending_id, state, reason}``
- ``group_create {group, source}``: the secondary group appears here (role secondary). ``group_remove``.
- ``check {path, size, force, nosync}``: may this secondary be written? ``admit {group, path, remote,
  size, nosync}``, ``dismiss {group, path}``.
- ``begin {group, generation, sync_id, base_generation, base_id, remotes, bind}``: record the sync in
  flight (durable), take R(n) of every synced secondary, export the secondaries on ``bind``; per remote
  ``{export: ExportInfo, base: bool}`` where ``base`` says this system holds sync point
  (base_generation, base_id): a delta is only safe when it does (design §4).
- ``commit {group, generation, sync_id}``: stop the exports, commit durably, delete R(n).
- ``abort {group, generation, sync_id, reason}``: stop the exports, promote R(n) onto every secondary.
- ``hash {group}`` -> ``{path: sha256}`` for ``rcopy verify``. ``ping`` -> ``{time}`` (heartbeat).

The agent holds the group's lock from ``begin`` to ``commit``/``abort``. If its stdin closes (the primary,
ssh or the link died) with a sync uncommitted it rolls back by itself; at start it rolls back any sync
left in flight whose lock nobody holds (the previous agent crashed). With a sync in flight and no
request for RCOPY_AGENT_TIMEOUT seconds (default 200) it rolls back and exits; a stale agent still
holding a group (its ssh session outlived a cut link) is stopped by the next agent the primary starts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Callable

from rcopy import __version__, backends
from rcopy.engine.names import snapshot_name, volume_name
from rcopy.engine.ports import Snapshotter
from rcopy.engine.snapshots import cut_by_backend, delete_named
from rcopy.errors import Busy, NotFound, RcopyError, Refused, StateError
from rcopy.model import Group, GroupState, Role, VolumePair, VolumeState, check_name
from rcopy.state import Store

log = logging.getLogger("rcopy.agent")
PROTOCOL = 1
TAKEOVER_WAIT = 60.0
# With a sync in flight, no request for this long means the primary or the link is gone: roll back and
# exit (3PAR fails a target after 200 s without heartbeat; the primary pings every few seconds).
IDLE_TIMEOUT = float(os.environ.get("RCOPY_AGENT_TIMEOUT", "200"))


def _fault(point: str):
    if os.environ.get("RCOPY_FAULT") == point:
        log.warning("RCOPY_FAULT=%s: exiting here on purpose", point)
        os._exit(98)


def export_address(bind: str) -> str:
    """Where to serve the secondaries: the local address of the link the primary came in on.

    Under ssh that is SSH_CONNECTION's server address (exactly the link in use, whatever names resolve
    to on this side: Debian maps the host's own name to 127.0.1.1); otherwise the link the primary named.
    """
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[2] if len(parts) == 4 else bind


def _default_exporter(volumes: dict[str, str], bind: str):
    from rcopy.transport.export import Export
    host = export_address(bind)
    # TLS with a throw-away certificate pinned by the primary, except on loopback (host tests).
    tls = not (host.startswith("127.") or host in ("::1", "localhost"))
    ex = Export(volumes, host=host, tls=tls)
    ex.start()
    return ex


class Agent:
    def __init__(self, store: Store, *, snapshotter_for: Callable[[str], Snapshotter] = backends.snapshotter_for,
                 exporter=_default_exporter):
        self.store = store
        self.snapshotter_for = snapshotter_for
        self.exporter = exporter
        self.active: dict[str, tuple[int, object, object]] = {}   # group -> (lock fd, export, sync_id)

    # -- lifecycle ----------------------------------------------------------------------------------
    def recover(self):
        """Roll back every sync left in flight by a dead agent (its lock is free); drop R snapshots
        left behind by an agent that died between its commit and their deletion."""
        for g in self.store.groups():
            if g.role not in (Role.SECONDARY, Role.SECONDARY_REV):
                continue
            fd = self.store.try_lock(g.name)
            if fd is None:
                continue            # a live agent is serving a sync of that group
            try:
                if g.pending_generation:
                    self._rollback(g, "the agent serving sync point "
                                      f"{g.pending_generation} died; rolled back to sync point {g.generation}")
                elif g.generation > 1:
                    for v in self.store.volumes(g.name):
                        self._delete(v.local, snapshot_name(g.name, v.name, "R", g.generation - 1))
            finally:
                os.close(fd)

    def hangup(self):
        """stdin closed: whatever is still in flight is rolled back (nothing was committed)."""
        for name in list(self.active):
            g = self.store.group(name)
            self._release(name, rollback_reason=f"the primary went away during sync point "
                                                f"{g.pending_generation}; rolled back to sync point {g.generation}")

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, request: dict) -> dict:
        rid = request.get("id")
        try:
            op = request.get("op", "")
            fn = getattr(self, "op_" + op, None)
            if fn is None:
                raise Refused(f"unknown agent operation {op!r}: the peers run different rcopy versions")
            return {"id": rid, "ok": True, "result": fn(**(request.get("args") or {}))}
        except RcopyError as e:
            cls = next(c for c in type(e).__mro__ if c.__module__ == "rcopy.errors")
            return {"id": rid, "ok": False, "error": {"class": cls.__name__, "exit_code": e.exit_code,
                                                      "message": str(e)}}
        except (TypeError, ValueError, KeyError) as e:
            return {"id": rid, "ok": False, "error": {"class": "UsageError", "exit_code": 2,
                                                      "message": f"bad request: {e}"}}

    # -- operations ---------------------------------------------------------------------------------
    def op_hello(self, protocol: int, peer: str = ""):
        if protocol != PROTOCOL:
            raise Refused(f"protocol {protocol} not supported (this agent speaks {PROTOCOL}): install the same rcopy on both")
        return {"system": self.store.system().name, "protocol": PROTOCOL, "version": __version__}

    def op_ping(self):
        return {"time": time.time()}

    def op_status(self, group: str):
        if not self.store.has_group(group):
            return {"exists": False}
        g = self.store.group(group)
        if g.pending_generation and group not in self.active:
            self._take_over(g)
            g = self.store.group(group)
        return {"exists": True, "generation": g.generation, "sync_id": g.sync_id,
                "pending_generation": g.pending_generation, "pending_id": g.pending_id,
                "state": g.state.value, "reason": g.reason, "role": g.role.value}

    def _secondary(self, group: str) -> Group:
        g = self.store.group(group)
        if g.role not in (Role.SECONDARY, Role.SECONDARY_REV):
            raise Refused(f"group {group} is {g.role.value} on {self.store.system().name}, not a secondary")
        return g

    def op_group_create(self, group: str, source: str):
        check_name("group", group)
        if self.store.has_group(group):
            g = self.store.group(group)
            if g.role is Role.SECONDARY and g.target == source:
                return {"created": False}
            raise Refused(f"group {group} already exists on {self.store.system().name} as {g.role.value} "
                          f"of {g.target}: pick another name")
        self.store.add_group(Group(group, source, role=Role.SECONDARY, state=GroupState.NEW))
        return {"created": True}

    def op_group_remove(self, group: str):
        if not self.store.has_group(group):
            return {"removed": False}
        g = self._secondary(group)
        with self.store.lock(group, "a sync"):
            for v in self.store.volumes(group):
                self._delete(v.local, snapshot_name(group, v.name, "R", g.generation) if g.generation else None)
            self.store.remove_group(group)
        return {"removed": True}

    def op_check(self, path: str, size: int, force: bool = False, nosync: bool = False):
        other = self.store.volume_by_local(path)
        if other:
            raise Refused(f"{path} is already the secondary of group {other.group} on {self.store.system().name}")
        backends.check_secondary(path, size, force=force, nosync=nosync)
        return {"size": size}

    def op_admit(self, group: str, path: str, remote: str, size: int, nosync: bool = False, force: bool = False):
        self._secondary(group)
        self.op_check(path, size, force=force, nosync=nosync)
        name = volume_name(path)
        state = VolumeState.SYNCED if nosync else VolumeState.NEW
        self.store.add_volume(VolumePair(group, name, path, remote, size, state=state))
        return {"name": name}

    def op_dismiss(self, group: str, path: str):
        v = self.store.volume_by_local(path)
        if v and v.group == group:
            self.store.remove_volume(group, v.name)
        return {"dismissed": bool(v)}

    def op_begin(self, group: str, generation: int, sync_id: str, base_generation: int, base_id: str,
                 remotes: list[str], bind: str):
        g = self._secondary(group)
        if group in self.active:
            raise Busy(f"group {group} already has a sync in flight on {self.store.system().name}")
        if g.pending_generation:
            self._take_over(g)
            g = self.store.group(group)
        fd = self.store.try_lock(group)
        if fd is None:
            raise Busy(f"group {group} is busy on {self.store.system().name}: another sync is being served")
        try:
            if g.pending_generation:
                self._rollback(g, f"sync point {g.pending_generation} was left in flight")
                g = self.store.group(group)
            vols = {v.local: v for v in self.store.volumes(group)}
            missing = [r for r in remotes if r not in vols]
            if missing:
                raise NotFound(f"{missing[0]} is not a secondary of group {group} on {self.store.system().name}")
            holds = g.generation > 0 and g.generation == base_generation and g.sync_id == base_id
            self.store.begin_sync(group, generation, sync_id, [vols[r].name for r in remotes])
            _fault("agent-after-begin")
            synced = [vols[r] for r in remotes if g.generation and vols[r].state is VolumeState.SYNCED
                      and vols[r].last_sync]
            self._cut(g, synced)
            export = self.exporter({vols[r].name: r for r in remotes}, bind)
        except Exception:
            self.store.abort_sync(group, "begin failed", stop=False)
            os.close(fd)
            raise
        self.active[group] = (fd, export, sync_id)
        infos = export.infos
        return {"volumes": {r: {"export": dataclasses.asdict(infos[vols[r].name]),
                                "base": holds and vols[r] in synced} for r in remotes}}

    def _take_over(self, g: Group):
        """Settle a sync in flight that another agent process still holds.

        The primary asks (status, before anything) only while it holds its own group lock, so an agent
        still serving this group is a leftover whose primary is gone (typically a cut link: its ssh
        session has not noticed yet). Stop it (SIGTERM: it rolls back on the way out) and wait, else
        roll back here once its lock is free.
        """
        fd = self.store.try_lock(g.name)
        if fd is None:
            pid = self.store.lock_holder(g.name)
            if pid and pid != os.getpid():
                log.warning("group %s: stopping the stale agent %s serving sync point %s", g.name, pid,
                            g.pending_generation)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + TAKEOVER_WAIT
            while fd is None and time.monotonic() < deadline:
                time.sleep(0.2)
                fd = self.store.try_lock(g.name)
            if fd is None:
                raise Busy(f"group {g.name} is held by another agent (pid {pid}) on {self.store.system().name}: "
                           "retry when it has finished")
        try:
            g = self.store.group(g.name)
            if g.pending_generation:
                self._rollback(g, f"sync point {g.pending_generation} was abandoned by its primary; "
                                  f"rolled back to sync point {g.generation}")
        finally:
            os.close(fd)

    def _cut(self, g: Group, vols: list[VolumePair]):
        # An existing R(n) is kept (cut is idempotent): it is a leftover of a failed begin, taken when
        # the secondary already read as sync point n; deleting it could lose the only copy.
        cut_by_backend(self.snapshotter_for,
                       [(v.local, snapshot_name(g.name, v.name, "R", g.generation)) for v in vols])

    def op_commit(self, group: str, generation: int, sync_id: str):
        g = self._secondary(group)
        if g.generation == generation and g.sync_id == sync_id:
            return {"committed": generation}          # a retried commit
        if group not in self.active or g.pending_id != sync_id:
            raise StateError(f"group {group}: sync point {generation} ({sync_id}) is not in flight on "
                             f"{self.store.system().name}; nothing to commit")
        fd, export, _ = self.active[group]
        export.stop()                                  # nbdkit gone: every write it acknowledged is on disk
        _fault("agent-before-commit")
        self.store.commit_sync(group, generation, sync_id)
        _fault("agent-after-commit")
        if g.generation:
            for v in self.store.volumes(group):
                self._delete(v.local, snapshot_name(group, v.name, "R", g.generation))
        del self.active[group]
        os.close(fd)
        return {"committed": generation}

    def op_abort(self, group: str, generation: int, sync_id: str, reason: str = ""):
        g = self._secondary(group)
        if not g.pending_generation:
            return {"rolled_back": False}
        if g.pending_id != sync_id:
            raise StateError(f"group {group}: sync point {generation} ({sync_id}) is not the one in flight")
        why = f"{reason or 'aborted by the primary'}; rolled back to sync point {g.generation}"
        if group in self.active:
            self._release(group, rollback_reason=why)
        else:
            with self.store.lock(group, "a sync"):
                self._rollback(g, why)
        return {"rolled_back": True}

    def op_hash(self, group: str):
        g = self._secondary(group)
        if g.pending_generation:
            raise Busy(f"group {group} is syncing on {self.store.system().name}: verify after the sync")
        return {v.local: backends.digest(v.local) for v in self.store.volumes(group)}

    # -- helpers ------------------------------------------------------------------------------------
    def _release(self, group: str, *, rollback_reason: str):
        fd, export, _ = self.active.pop(group)
        try:
            export.stop()
            self._rollback(self.store.group(group), rollback_reason)
        finally:
            os.close(fd)

    def _rollback(self, g: Group, reason: str):
        """Promote R(n) back onto every secondary that has one, then forget the sync in flight."""
        log.warning("group %s: %s", g.name, reason)
        if g.generation:
            for v in self.store.volumes(g.name):
                snapper = self.snapshotter_for(v.local)
                snap = snapper.find(v.local, snapshot_name(g.name, v.name, "R", g.generation))
                if snap is not None:
                    snapper.rollback(snap)
        self.store.abort_sync(g.name, reason)

    def _delete(self, path: str, name: str | None):
        if name:
            delete_named(self.snapshotter_for, path, name)


def _lines(fd: int, agent: Agent):
    """Lines from fd; while a sync is in flight, stop after IDLE_TIMEOUT seconds without one."""
    buf = b""
    while True:
        while b"\n" not in buf:
            timeout = IDLE_TIMEOUT if agent.active else None
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                log.warning("no request for %.0f s with a sync in flight: the primary is gone", IDLE_TIMEOUT)
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.decode(errors="replace")


def serve(store: Store, stdin=None, stdout=None, agent: Agent | None = None) -> int:
    """Answer requests until stdin closes (or goes silent mid-sync); roll back what is still in flight.

    SIGTERM (a newer agent taking over, or the admin) ends the loop the same way.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    agent = agent or Agent(store)

    def _term(*_):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, _term)
    try:
        agent.recover()
        for line in _lines(stdin.fileno(), agent):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError as e:
                reply = {"id": None, "ok": False, "error": {"class": "UsageError", "exit_code": 2,
                                                            "message": f"not JSON: {e}"}}
            else:
                reply = agent.handle(request)
            stdout.write(json.dumps(reply) + "\n")
            stdout.flush()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # finish the rollback whatever comes
        agent.hangup()
    return 0
