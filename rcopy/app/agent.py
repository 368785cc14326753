"""The backup's end of the control channel: ``rcopy agent`` serves JSON-lines RPC on stdin/stdout.

One request per line ``{"id": N, "op": OP, "args": {...}}``; one reply per line, ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": {"class", "exit_code", "message"}}`` (peer.py).
Operations (all idempotent where a retry can happen):

- ``hello {protocol, peer}`` -> ``{system, protocol, version}``
- ``status {group}`` -> ``{exists, generation, sync_id, pending_generation, pending_id, state, reason, role,
  volumes}`` where ``volumes`` maps each secondary's path to its volume state: the facts a plan needs.
- ``group_create {group, source}``: the secondary group appears here (role secondary). ``group_remove``.
- ``check {path, size, force, nosync}``: may this secondary be written? ``admit {group, path, remote,
  size, nosync}``, ``dismiss {group, path}``.
- ``begin {group, generation, sync_id, base_generation, base_id, remotes, bind, client_cert}``: record the sync in
  flight (durable), take R(n) of every synced secondary (one cut), export the secondaries on ``bind``;
  answers ``{view, volumes: {remote: {export: ExportInfo}}}`` where ``view`` is the status as it was
  before this begin: the primary plans delta or full from it (a delta only onto a held base, design §4).
- ``commit {group, generation, sync_id}``: stop the exports, commit durably, delete R(n); answers the
  number of external commands this side ran for the sync (``commands``).
- ``abort {group, generation, sync_id, reason}``: stop the exports, promote R(n) onto every secondary.
- ``digests {group, sync_id, remote, spans}`` -> ``{digests}``: base64 of one 16-byte BLAKE2b digest per
  4 KiB block of ``spans`` ([start, end] byte pairs) of secondary ``remote`` of the sync in flight, as
  it holds them now: the primary's refine compares them with the new snapshot's (rcopy.changes.digest).
- ``hash {group}`` -> ``{path: sha256}`` for ``rcopy verify``. ``ping`` -> ``{time}`` (heartbeat).
- ``attach {group, sync_id}``: the primary lost the link its channel to the agent serving that sync ran
  on and came back on another: this process hands its channel to that agent (rcopy.app.handover) and
  from then on only relays; the serving agent keeps its lock, its exports and R(n).

The agent holds the group's lock from ``begin`` to ``commit``/``abort``. If its stdin closes (the primary,
ssh or the link died) with a sync uncommitted it rolls back by itself; at start it rolls back any sync
left in flight whose lock nobody holds (the previous agent crashed). With a sync in flight and no
request for the target timeout (the primary's target's ``target_timeout``, sent in ``hello``; default
200 s; RCOPY_AGENT_TIMEOUT on this side overrides it) it rolls back and exits; a stale agent still
holding a group (its ssh session outlived a cut link) is stopped by the next agent the primary starts.
"""
from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time

from rcopy import __version__, backends, faults
from rcopy.app import handover
from rcopy.app.local import fill_kinds
from rcopy.names import snapshot_name, volume_name
from rcopy.engine.states import Event, transition
from rcopy.errors import Busy, NotFound, RcopyError, Refused, StateError, by_name
from rcopy.model import TARGET_TIMEOUT, Group, GroupState, Role, VolumePair, VolumeState, check_name
from rcopy.state import Store
from rcopy.sys import lvm, netlink, run
from rcopy.sys.channel import ChannelTimeout, LineReader, LineTooLong

log = logging.getLogger("rcopy.agent")
PROTOCOL = 1
TAKEOVER_WAIT = 60.0
TIDY_WAIT = 120.0        # s a begin waits for another agent's tidy-up after its commit (seconds, usually)
HANDOVER_POLL = 1.0      # s between looks for a channel handed over while a sync is in flight
JOIN_POLL = 0.1          # s between a begin's looks at a group another agent holds


def export_address(bind: str) -> str:
    """Where to serve the secondaries: the local address of the link the primary came in on.

    Under ssh that is SSH_CONNECTION's server address (exactly the link in use, whatever names resolve
    to on this side: Debian maps the host's own name to 127.0.1.1); otherwise the link the primary named.
    """
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[2] if len(parts) == 4 else bind


def primary_address() -> str | None:
    """The primary's address on the link it came in on (SSH_CONNECTION's client address, without an
    IPv6 zone): the only address the export admits. None when the agent was not reached by ssh."""
    parts = os.environ.get("SSH_CONNECTION", "").split()
    return parts[0].split("%")[0] if len(parts) == 4 else None


# nbdkit's blocksize filter read-modify-writes blocks up to 64 KiB on the backup (no extra bytes on the
# wire); a coarser granule is left to the primary, which rounds its writes out (ExportInfo.write_align).
EXPORT_RMW_MAX = 64 * 1024


def local_addresses(links) -> tuple[str, ...]:
    """The links (host names or IP literals, as the primary names this system) that are addresses of
    this host, numeric: where the export can listen besides the control channel's link. A name that
    does not resolve, or an address this host does not hold, is left out (it cannot be bound)."""
    found = []
    for link in links:
        addr = next(iter(netlink.addresses(link)), None)
        if addr is None or "%" in addr:   # unresolved, or scoped (link-local IPv6): that zone names an
            log.info("link %s: no export on it (%s)", link, addr or "does not resolve")   # interface here
            continue
        try:
            with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((addr, 0))
        except OSError as e:
            log.info("link %s is not an address of this host (%s): no export on it", link, e)
            continue
        found.append(addr)
    return tuple(found)


def peer_addresses(links) -> tuple[str, ...]:
    """The primary's link addresses as this system names them (its target record), numeric."""
    found = []
    for link in links:
        addr = next(iter(netlink.addresses(link)), None)
        if addr is None:
            log.info("link %s of the primary does not resolve: not admitted to the export", link)
        else:
            found.append(addr.split("%")[0])
    return tuple(found)


def _default_exporter(volumes: dict[str, str], bind: str, client_cert: str = "", granule: int = 0,
                      links: tuple[str, ...] = (), peers: tuple[str, ...] = (), unmap: dict[str, int] | None = None):
    """Export the volumes on the control channel's link and on every other link of ``links`` that is an
    address here; admit the primary's address on the control link and ``peers`` (its other links)."""
    from rcopy.transport.export import Export
    host = export_address(bind)
    # TLS with a throw-away certificate pinned by the primary, admitting only the primary's own
    # per-session certificate, except on loopback (host tests).
    tls = not (host.startswith("127.") or host in ("::1", "localhost"))
    if tls and not client_cert:
        raise Refused("the primary sent no client certificate for the export: install the same rcopy on both")
    # and a second fence: connections from any address but the primary's are closed before the handshake
    first = primary_address()
    allow = tuple(dict.fromkeys([first, *peer_addresses(peers)])) if first else ()
    ex = Export(volumes, host=host, tls=tls, client_cert_pem=client_cert or None,
                minblock=granule if granule <= EXPORT_RMW_MAX else 0, allow_peers=allow,
                more_hosts=local_addresses(l for l in links if l != bind), unmap=unmap)
    ex.start()
    if granule > EXPORT_RMW_MAX:
        ex.infos = {n: dataclasses.replace(i, write_align=granule) for n, i in ex.infos.items()}
    return ex


class Agent:
    def __init__(self, store: Store, *, backend=backends.get, cut=backends.cut, delete=backends.delete,
                 probe=backends.probe, exporter=_default_exporter):
        self.store = store
        self.backend, self.cut, self.delete, self.probe = backend, cut, delete, probe
        self.exporter = exporter
        self.active: dict[str, tuple[int, object, object]] = {}   # group -> (lock fd, export, sync_id)
        self.books: dict[str, run.Ledger] = {}                     # group -> commands run for its sync
        # commands of this session not yet charged to a sync (start-up recovery, status): the next
        # begin takes them over, so a sync's count is everything its session cost the backup
        self.session = run.Ledger()
        # With a sync in flight, no request for this long means the primary or the link is gone: roll
        # back and exit (3PAR fails a target after 200 s without heartbeat; the primary pings every few
        # seconds). The primary's hello says its target timeout; RCOPY_AGENT_TIMEOUT here wins over it.
        fixed = os.environ.get("RCOPY_AGENT_TIMEOUT")
        self.idle_fixed = bool(fixed)
        self.idle_timeout = float(fixed or TARGET_TIMEOUT)
        self.listening: dict[str, socket.socket] = {}    # group -> where a new channel may attach
        self.begun: dict[str, dict] = {}                 # group -> the answer to its sync's begin
        # group -> (lock fd, secondaries' LVs, generation of its R) of a commit answered, not tidied yet
        self.tidying: dict[str, tuple[int, dict, int]] = {}
        self.untidy: dict[str, Exception] = {}          # group -> why its last tidy-up failed
        self.channel: socket.socket | None = None        # the channel handed over to us, once one was
        self.relay: socket.socket | None = None          # the serving agent we attached to (we relay)

    # -- lifecycle ----------------------------------------------------------------------------------
    def recover(self):
        """Roll back every sync left in flight by a dead agent (its lock is free), and finish the
        tidy-up of a commit whose agent died before it (``groups.tidy``): nothing to do reads no report."""
        for g in self.store.groups():
            if g.role in (Role.SECONDARY, Role.SECONDARY_REV) and (g.pending_generation or g.tidy):
                self.rollback_abandoned(g)

    def rollback_abandoned(self, g: Group) -> bool:
        """Roll back a sync in flight that no agent serves any more (its agent was killed), or finish
        a committed one's tidy-up; a live agent's group (its lock held) is left alone. The backup's
        daemon calls this each tick."""
        fd = self.store.try_lock(g.name)
        if fd is None:
            return False
        try:
            g = self.store.group(g.name)
            if g.tidy and (g.sends or g.tidy != g.generation):
                self.store.tidied(g.name, g.tidy)   # stale: the side took over since (its takeover tidied)
                g = self.store.group(g.name)
            if g.sends or not (g.pending_generation or g.tidy):
                return False
            fill_kinds(self.store, g.name)      # (suspended secondaries were resumed by open_store)
            if g.pending_generation:
                self._rollback(g, f"the agent serving sync point {g.pending_generation} died; rolled back to "
                                  f"sync point {g.generation}")
            else:
                self._tidy(g, g.generation - 1, sure=False)
            return True
        finally:
            os.close(fd)

    def hangup(self):
        """stdin closed: whatever is still in flight is rolled back (nothing was committed)."""
        self.tidy_up()
        for name in list(self.active):
            g = self.store.group(name)
            self._release(name, rollback_reason=f"the primary went away during sync point "
                                                f"{g.pending_generation}; rolled back to sync point {g.generation}")

    def take_handover(self) -> socket.socket | None:
        """A channel another agent process attached for one of our syncs: from now on our requests
        come from it and our replies go to it (the previous channel is left; its link is dead)."""
        for group, listener in self.listening.items():
            conn = handover.accept(listener)
            if conn is not None:
                log.warning("group %s: the primary came back over another link; its requests now reach "
                            "this agent through the agent it started there", group)
                if self.channel is not None:
                    self.channel.close()
                self.channel = conn
                return conn
        return None

    def _listen(self, group: str) -> None:
        try:
            self.listening[group] = handover.listen(self.store.dir, group)
        except OSError as e:        # the sync runs on; only a move of its channel is out of reach
            log.warning("group %s: no channel handover possible for this sync: %s", group, e)

    def _unlisten(self, group: str) -> None:
        self.begun.pop(group, None)
        listener = self.listening.pop(group, None)
        if listener is not None:
            listener.close()

    # -- dispatch -----------------------------------------------------------------------------------
    def handle(self, request) -> dict:
        """One reply for one request, whatever it holds: the agent never dies on its input."""
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("args", {}) or {}, dict):
                raise TypeError("a request is an object {id, op, args} with args an object")
            op = request.get("op", "")
            fn = getattr(self, "op_" + op, None) if isinstance(op, str) else None
            if fn is None:
                raise Refused(f"unknown agent operation {op!r}: the peers run different rcopy versions")
            args = request.get("args") or {}
            _check_args(fn, args)
            book = self.books.get(args.get("group")) or self.session
            with run.ledger(book), lvm.reports():       # one LVM report per VG answers a request's questions
                return {"id": rid, "ok": True, "result": fn(**args)}
        except RcopyError as e:
            cls = next(c for c in type(e).__mro__ if c.__module__ == "rcopy.errors")
            return _error(rid, cls.__name__, e.exit_code, str(e))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            return _error(rid, "UsageError", 2, f"bad request: {e}")
        except (OSError, sqlite3.Error) as e:
            log.exception("request %r failed", request.get("op"))
            return _error(rid, "StateError", 14, f"the agent on {self.store.system().name} failed: {e}")

    # -- operations ---------------------------------------------------------------------------------
    def op_hello(self, protocol: int, peer: str = "", idle_timeout: float | None = None):
        if protocol != PROTOCOL:
            raise Refused(f"protocol {protocol} not supported (this agent speaks {PROTOCOL}): install the same rcopy on both")
        if idle_timeout and not self.idle_fixed:
            self.idle_timeout = max(10.0, float(idle_timeout))
        return {"system": self.store.system().name, "protocol": PROTOCOL, "version": __version__}

    def op_ping(self):
        return {"time": time.time()}

    def op_status(self, group: str):
        faults.point("agent-at-status", 98)         # the link lost between hello and begin
        if not self.store.has_group(group):
            return {"exists": False}
        g = self.store.group(group)
        if g.pending_generation and group not in self.active and not g.sends:
            self.settle_abandoned(g)
            g = self.store.group(group)
        return self._view(g)

    def _view(self, g: Group) -> dict:
        """The group as the primary plans from it (rcopy.engine.cycle.PeerView). A secondary counts as
        synced at the group's sync point only if it carries that point's mark too: a state directory
        restored from elsewhere, or a secondary replaced by hand, then makes it go full."""
        volumes = self.store.volumes(g.name)
        want = backends.mark_of(g.name, g.generation, g.sync_id)
        marks = backends.marks([(v.backend, v.local) for v in volumes], g.name) if g.generation else {}
        vols = {}
        for v in volumes:
            state = v.state.value if v.state is not VolumeState.SYNCED or v.last_sync else "new"
            if state == VolumeState.SYNCED.value and marks.get(v.local) not in (None, want):
                state = f"unmarked (carries {marks[v.local] or 'no mark'}, not sync point {g.generation})"
            vols[v.local] = state
        return {"exists": True, "generation": g.generation, "sync_id": g.sync_id,
                "pending_generation": g.pending_generation, "pending_id": g.pending_id,
                "state": g.state.value, "reason": g.reason, "role": g.role.value, "volumes": vols}

    def _peer_links(self, g: Group) -> tuple[str, ...]:
        """The primary's links as this system knows them (mirror config names both sides' targets)."""
        try:
            return self.store.target(g.target).links
        except NotFound:
            return ()

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
            if g.generation:
                self._delete_all(g, "R", g.generation)
            backends.protect([(v.backend, v.local) for v in self.store.volumes(group)], writable=True, group=group)
            self.store.remove_group(group)
        return {"removed": True}

    def op_check(self, path: str, size: int, force: bool = False, nosync: bool = False):
        probe = self.probe(path)
        other = self.store.volume_by_local(path, probe.identity)
        if other:
            raise Refused(f"{path} is already the secondary of group {other.group} on {self.store.system().name}"
                          + ("" if other.local == path else f" (as {other.local}: the same device)"))
        backends.check_secondary(path, size, force=force, nosync=nosync)
        return {"size": size, "backend": probe.kind, "device_id": probe.identity}

    def op_admit(self, group: str, path: str, remote: str, size: int, nosync: bool = False, force: bool = False,
                 create: str = "", used: int = 0):
        """Admit ``path`` as the secondary of ``remote``. With ``create`` (VG or VG/POOL) the secondary
        is made here first, named ``path`` (an LV name), and removed again if the admit fails."""
        self._secondary(group)
        if not create:
            return self._admit(group, path, remote, size, nosync=nosync, force=force)
        if nosync:
            raise Refused("--create with --nosync: a new secondary cannot already equal the primary")
        made = backends.create_secondary(create, path, size, used)
        try:
            return self._admit(group, made, remote, size, nosync=False, force=True)   # ours, empty
        except Exception:
            backends.remove_created(made)
            raise

    def _admit(self, group: str, path: str, remote: str, size: int, *, nosync: bool, force: bool):
        checked = self.op_check(path, size, force=force, nosync=nosync)
        name = volume_name(path)
        state = VolumeState.SYNCED if nosync else VolumeState.NEW
        self.store.add_volume(VolumePair(group, name, path, remote, size, state=state,
                                         backend=checked["backend"], device_id=checked["device_id"]))
        backends.protect([(checked["backend"], path)], writable=False)      # nobody but a sync writes it
        return {"name": name, "path": path}

    def op_dismiss(self, group: str, path: str):
        v = self.store.volume_by_local(path)
        if v and v.group == group:
            backends.protect([(v.backend, v.local)], writable=True, group=group)   # the admin's again
            self.store.remove_volume(group, v.name)
        return {"dismissed": bool(v)}

    def op_begin(self, group: str, generation: int, sync_id: str, base_generation: int, base_id: str,
                 remotes: list[str], bind: str, client_cert: str = "", links: list[str] = ()):
        faults.point("agent-at-begin", 98)          # the begin lost in the link: nothing done here
        g = self._secondary(group)
        if group in self.active:
            if self.active[group][2] == sync_id and group in self.begun:
                return self.begun[group]      # asked again through a channel that moved (its answer was lost)
            raise Busy(f"group {group} already has a sync in flight on {self.store.system().name}")
        args = dict(group=group, generation=generation, sync_id=sync_id, base_generation=base_generation,
                    base_id=base_id, remotes=remotes, bind=bind, client_cert=client_cert, links=list(links))
        if g.pending_generation and g.pending_id == sync_id and self._join(group):
            return self._ask_joined("begin", args)
        if g.pending_generation:
            self.settle_abandoned(g)
            g = self.store.group(group)
        fd = self.store.try_lock(group) if g.pending_generation else self._lock_or_join(group)
        if fd is None:
            if self.relay is not None:
                return self._ask_joined("begin", args)
            raise Busy(f"group {group} is busy on {self.store.system().name}: another sync is being served")
        self._listen(group)                 # from now: a channel that moves mid-begin waits to be taken
        faults.cut_unnoticed("agent-stalls-in-begin", self.listening.get(group))
        held = None
        try:
            if g.pending_generation:
                self._rollback(g, f"sync point {g.pending_generation} was left in flight")
                g = self.store.group(group)
            elif g.tidy:                        # its agent died after the commit: finish, as a start does
                self._tidy(g, g.generation - 1, sure=False)
                g = self.store.group(group)
            vols = {v.local: v for v in self.store.volumes(group)}
            missing = [r for r in remotes if r not in vols]
            if missing:
                raise NotFound(f"{missing[0]} is not a secondary of group {group} on {self.store.system().name}")
            view = self._view(g)
            self.books[group] = book = self.session
            self.session = run.Ledger()
            with run.ledger(book), lvm.reports():
                self.store.begin_sync(group, generation, sync_id, [vols[r].name for r in remotes])
                faults.point("agent-after-begin", 98)
                synced = [vols[r] for r in remotes if g.generation and vols[r].state is VolumeState.SYNCED
                          and vols[r].last_sync]
                # What the export and protect need, from the report the cut reads too (the cut's
                # lvcreates drop it: asked after them, they would cost another lvs each)
                pairs = [(vols[r].backend, r) for r in remotes]
                granule, known = backends.write_granule(pairs), backends.resolve(pairs)
                unmap = {vols[r].name: g for r, g in backends.unmap_granules(pairs).items()}
                # An existing complete R(n) is kept (reuse): a leftover of a failed begin, taken when the
                # secondary already read as sync point n; deleting it could lose the only copy.
                self.cut([(v.backend, v.local, snapshot_name(g.name, v.name, "R", g.generation)) for v in synced],
                         idle=True)                     # read-only until open_for_sync below: nobody writes
                held = backends.open_for_sync(pairs, known=known)
                export = self.exporter({vols[r].name: r for r in remotes}, bind, client_cert, granule,
                                       links=tuple(links), peers=self._peer_links(g), unmap=unmap)
        except Exception:
            self._unlisten(group)
            if held is not None:            # opened for a sync that will not come: read-only again
                try:
                    backends.protect(pairs, writable=False, known=held)
                except RcopyError as e:
                    log.error("group %s: cannot make the secondaries read-only again: %s", group, e)
            self.store.abort_sync(group, "begin failed", state=None)
            self.books.pop(group, None)
            os.close(fd)
            raise
        self.active[group] = (fd, export, sync_id, held)
        infos = export.infos
        self.begun[group] = {"view": view, "volumes": {r: {"export": dataclasses.asdict(infos[vols[r].name])}
                                                       for r in remotes}}
        return self.begun[group]

    def _lock_or_join(self, group: str) -> int | None:
        """The group's lock for a begin with nothing on record in flight. Its holder is an agent finishing
        the last commit's tidy-up (seconds: wait for it), or one that took this very begin over a link
        that died under it before its answer came back (the primary asked again here): that one listens
        for a channel from the moment it holds the lock, so join it (None, ``self.relay`` set). None
        with no relay: still held after TIDY_WAIT."""
        deadline = time.monotonic() + TIDY_WAIT
        while True:
            fd = self.store.try_lock(group)
            if fd is not None or self._join(group) or time.monotonic() >= deadline:
                return fd
            time.sleep(JOIN_POLL)

    def _join(self, group: str) -> bool:
        """Attach to the agent serving ``group`` here, if one listens (``self.relay``)."""
        try:
            self.relay = handover.connect(self.store.dir, group)
        except OSError:
            return False
        log.warning("group %s: the agent serving it took a begin whose link died; this channel joins it", group)
        return True

    def _ask_joined(self, op: str, args: dict):
        """``op`` answered by the agent we joined (it serves this sync, so asked again it answers what it
        answered the lost channel); on an error the relay is dropped, which ends its channel."""
        reply = handover.ask(self.relay, {"id": 0, "op": op, "args": args}, self.idle_timeout)
        if reply is None or not reply.get("ok"):
            self.relay.close()
            self.relay = None
            if reply is None:
                raise Busy(f"group {args['group']}: the agent serving its sync on {self.store.system().name} "
                           "did not answer: retry")
            err = reply.get("error") or {}
            raise by_name(str(err.get("class", "")), int(err.get("exit_code", 11)))(
                str(err.get("message", "the agent serving the sync failed")))
        return reply.get("result")

    def settle_abandoned(self, g: Group):
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
            fd = self.store.wait_lock(g.name, TAKEOVER_WAIT)
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

    def op_commit(self, group: str, generation: int, sync_id: str):
        g = self._secondary(group)
        if g.generation == generation and g.sync_id == sync_id:
            return {"committed": generation}          # a retried commit
        if group not in self.active or g.pending_id != sync_id:
            raise StateError(f"group {group}: sync point {generation} ({sync_id}) is not in flight on "
                             f"{self.store.system().name}; nothing to commit")
        fd, export, _, held = self.active[group]
        export.stop()                                  # nbdkit gone: every write it acknowledged is on disk
        faults.point("agent-before-commit", 98)
        after = transition(g, Event.SYNC_DONE)
        self.store.commit_sync(group, generation, sync_id, state=after.state, reason=after.reason, fault=after.fault,
                               tidy=True)
        faults.point("agent-after-commit", 98)
        del self.active[group]
        self._unlisten(group)
        # The tidy-up runs right after this answer (tidy_up), still under the group's lock, while the
        # primary deletes its own old snapshots: the two sides' clean-ups overlap.
        self.tidying[group] = (fd, held, g.generation)
        return {"committed": generation, "tidy": True}

    def op_tidy(self, group: str):
        """The commands this sync cost here, its tidy-up included (done by the time this request is
        read); the tidy-up's error if it failed (the next agent start, begin or daemon tick retries it)."""
        self.tidy_up()
        book = self.books.pop(group, None)
        why = self.untidy.pop(group, None)
        if why is not None:
            raise why
        return {"tidied": True, **(book.as_dict() if book else {"commands": None, "commands_by_tool": {}})}

    def tidy_up(self):
        """Tidy up the commits answered (see op_commit); a failure is kept for op_tidy and the log."""
        for group in list(self.tidying):
            fd, held, r_generation = self.tidying.pop(group)
            try:
                with run.ledger(self.books.get(group)), lvm.reports():
                    self._tidy(self.store.group(group), r_generation, known=held)
            except RcopyError as e:
                log.error("group %s: the tidy-up after sync point %s failed (retried at the next start): %s",
                          group, r_generation + 1, e)
                self.untidy[group] = e
            finally:
                os.close(fd)

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

    def op_attach(self, group: str, sync_id: str):
        g = self._secondary(group)
        where = self.store.system().name
        if group in self.active or not g.pending_generation or g.pending_id != sync_id:
            raise StateError(f"group {group}: sync {sync_id} is not in flight on {where} (it was rolled back "
                             "or committed): nothing to attach to")
        try:
            self.relay = handover.connect(self.store.dir, group)
        except OSError as e:
            raise StateError(f"group {group}: the agent serving sync point {g.pending_generation} on {where} "
                             f"is gone ({e.strerror or e}); it rolls the sync back") from None
        return {"attached": g.pending_generation}

    # -- disaster recovery (rcopy.app.dr): the peer that failed over, recovers or restores asks -------
    def op_fence(self, group: str, by: str):
        from rcopy.app import dr
        return {"fault": dr.fence(self.store, group, by).fault}

    def op_step_down(self, group: str, role: str, generation: int, sync_id: str, force: bool = False):
        from rcopy.app import dr
        return dr.step_down(self.store, group, role=_receiving_role(role), generation=generation,
                            sync_id=sync_id, force=force)

    def op_take_over(self, group: str, role: str, generation: int, sync_id: str, kind: str, state: str):
        from rcopy.app import dr
        g = self.store.group(group)
        if not g.sends and (g.generation, g.sync_id) != (generation, sync_id):
            raise StateError(f"group {group} holds sync point {g.generation} on {self.store.system().name}, "
                             f"not {generation}: sync first")
        if kind not in ("F", "P") or role not in (Role.PRIMARY.value, Role.PRIMARY_REV.value):
            raise Refused(f"cannot take over as {role} with a {kind} base")
        after = dr.take_over(self.store, group, role=Role(role), kind=kind, state=GroupState(state),
                             reason="" if state == GroupState.STARTED.value else
                             f"reversed: this system sends to {g.target}")
        return {"role": after.role.value, "generation": after.generation}

    def op_relabel(self, group: str):
        from rcopy.app import dr
        return {"role": dr.relabel(self.store, group).role.value}

    def op_digests(self, group: str, sync_id: str, remote: str, spans: list):
        """Only the secondaries of the sync this agent serves, only while it is in flight: before their
        first write of this sync (the primary asks before it sends that volume anything)."""
        active = self.active.get(group)
        if active is None or active[2] != sync_id:
            raise StateError(f"group {group} has no sync {sync_id} in flight on {self.store.system().name}")
        if remote not in self.begun.get(group, {}).get("volumes", {}):
            raise NotFound(f"{remote} is not a secondary of the sync of group {group} in flight on "
                           f"{self.store.system().name}")
        from rcopy.changes.digest import digests_of          # not imported by an agent that never syncs
        return {"digests": base64.b64encode(digests_of(remote, spans)).decode()}

    def op_hash(self, group: str):
        g = self._secondary(group)
        if g.pending_generation:
            raise Busy(f"group {group} is syncing on {self.store.system().name}: verify after the sync")
        return {v.local: backends.digest(v.local) for v in self.store.volumes(group)}

    # -- helpers ------------------------------------------------------------------------------------
    def _release(self, group: str, *, rollback_reason: str):
        self.books.pop(group, None)
        fd, export, *_ = self.active.pop(group)
        self._unlisten(group)
        try:
            export.stop()
            self._rollback(self.store.group(group), rollback_reason)
        finally:
            os.close(fd)

    def _rollback(self, g: Group, reason: str):
        """Promote R(n) back onto every secondary that has one, then forget the sync in flight.

        A rollback that fails (e.g. an overflowed R(n) that LVM refuses to merge) never blocks the
        agent or the other volumes and groups: that secondary is marked failed with the reason (it is
        not at any sync point; its next sync is full) and the others are rolled back.
        """
        log.warning("group %s: %s", g.name, reason)
        broken: dict[str, VolumeState] = {}
        volumes = self.store.volumes(g.name)
        if g.generation:
            for v in volumes:
                snapper = self.backend(v.backend).snapshotter
                try:
                    snap = snapper.find(v.local, snapshot_name(g.name, v.name, "R", g.generation))
                    if snap is not None:
                        snapper.rollback(snap)
                except RcopyError as e:
                    log.error("group %s: cannot roll %s back to sync point %s: %s", g.name, v.local,
                              g.generation, e)
                    broken[v.name] = VolumeState.FAILED
                    reason += f"; {v.local} could not be rolled back ({e}): marked failed, its next sync is full"
        try:
            backends.protect([(v.backend, v.local) for v in volumes], writable=False)
        except RcopyError as e:
            log.error("group %s: cannot make the secondaries read-only again: %s", g.name, e)
        after = transition(g, Event.SYNC_FAILED, reason, "interrupted")
        self.store.abort_sync(g.name, after.reason, state=after.state, fault=after.fault, marks=broken)

    def _tidy(self, g: Group, r_generation: int, *, known: dict | None = None, sure: bool = True):
        """After the commit of g's sync point: delete R(``r_generation``), the rollback point, then make
        the secondaries read-only again, marked with the point they now hold. ``sure``: this agent
        committed it, so every secondary holds it; else (finishing a dead agent's) only those marked
        with the point before are re-marked, and the others go full at the next sync, as before."""
        faults.point("agent-before-tidy", 98)
        vols = [(v.backend, v.local) for v in self.store.volumes(g.name)]
        mark = backends.mark_of(g.name, g.generation, g.sync_id)
        try:
            if r_generation:
                self._delete_all(g, "R", r_generation)
        finally:
            if sure:
                backends.protect(vols, writable=False, group=g.name, mark=mark, known=known)
            else:
                had, before = backends.marks(vols, g.name), f"rcopy:{g.name}:{g.generation - 1}:"
                held = [(k, p) for k, p in vols if had.get(p) == mark or (had.get(p) or "").startswith(before)]
                backends.protect(held, writable=False, group=g.name, mark=mark)
                backends.protect([kp for kp in vols if kp not in held], writable=False)
        self.store.tidied(g.name, g.generation)

    def _delete_all(self, g: Group, kind: str, generation: int):
        self.delete([(v.backend, v.local, snapshot_name(g.name, v.name, kind, generation))
                     for v in self.store.volumes(g.name)])


def _receiving_role(role: str) -> Role:
    if role not in (Role.SECONDARY.value, Role.SECONDARY_REV.value):
        raise Refused(f"a side steps down to secondary or secondary-rev, not {role!r}")
    return Role(role)


_TYPES = {"str": str, "int": int, "bool": bool, "float": (int, float), "list[str]": list}


def _check_args(fn, args: dict) -> None:
    """Every argument has the type its operation declares, and a group name is a valid name, before
    anything reaches the store or a path (a hostile or broken primary gets a UsageError)."""
    params = inspect.signature(fn).parameters
    for key, value in args.items():
        p = params.get(key)
        if p is None:
            raise TypeError(f"unexpected argument {key!r}")
        want = _TYPES.get(str(p.annotation))
        if want is not None and not isinstance(value, want):
            raise TypeError(f"argument {key!r} must be {p.annotation}, not {type(value).__name__}")
        if want is list and not all(isinstance(x, str) for x in value):
            raise TypeError(f"argument {key!r} must be a list of strings")
    if "group" in args:
        check_name("group", args["group"])


def _error(rid, cls: str, code: int, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"class": cls, "exit_code": code, "message": message}}


def _lines(fd: int, agent: Agent):
    """Lines from fd, or from a channel handed over to us since; while a sync is in flight, stop after
    the idle timeout without one. A line over the limit is skipped and answered with an error."""
    reader, last = LineReader(fd), time.monotonic()
    conn = None
    while True:
        conn = conn or agent.take_handover()
        if conn is not None:
            reader, last, conn = LineReader(conn.fileno()), time.monotonic(), None
        wait = max(0.0, last + agent.idle_timeout - time.monotonic()) if agent.active else None
        if agent.listening:
            wait = HANDOVER_POLL if wait is None else min(wait, HANDOVER_POLL)
        try:
            line = reader.readline(wait)
        except ChannelTimeout:
            if agent.active and time.monotonic() - last >= agent.idle_timeout:
                log.warning("no request for %.0f s with a sync in flight: the primary is gone", agent.idle_timeout)
                return
            continue
        except LineTooLong as e:
            yield e
            continue
        if line is None:
            # the end of a channel whose replacement attached meanwhile (the primary closes the old
            # one once the new one is attached) is not a hang-up
            conn = agent.take_handover()
            if conn is None:
                return
            continue
        yield line.decode(errors="replace")
        last = time.monotonic()                 # silence counts from our answer, as the primary's does


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
    # One LVM report per VG serves the whole session until rcopy itself changes something (any
    # lvcreate, lvchange or lvremove drops it): start-up recovery, the primary's status and its begin,
    # seconds apart, read one report, not three. What others change meanwhile shows at the next read
    # after our own first change.
    with lvm.reports():
        return _serve(agent, stdin, stdout)


def _serve(agent: Agent, stdin, stdout) -> int:
    try:
        with run.ledger(agent.session):
            agent.recover()
        for line in _lines(stdin.fileno(), agent):
            if isinstance(line, LineTooLong):
                reply = _error(None, "UsageError", 2, str(line))
            elif not line.strip():
                continue
            else:
                try:
                    request = json.loads(line)
                except ValueError as e:
                    reply = _error(None, "UsageError", 2, f"not JSON: {e}")
                else:
                    reply = agent.handle(request)
            if agent.channel is not None:
                try:
                    agent.channel.sendall((json.dumps(reply) + "\n").encode())
                except OSError as e:            # the relay is gone: as good as our stdin closing
                    log.warning("the channel handed over to this agent closed: %s", e)
                    return 0
            else:
                stdout.write(json.dumps(reply) + "\n")
                stdout.flush()
            agent.tidy_up()                     # a commit's, once its answer is on the way
            if agent.relay is not None:         # attached: the serving agent answers from now on
                handover.relay(stdin.fileno(), stdout.fileno(), agent.relay)
                return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # finish the rollback whatever comes
        agent.hangup()
    return 0
