"""The primary's end of the control channel: JSON-lines RPC with the target's ``rcopy agent``.

Wire format (one JSON object per line, both ways; documented beside the server in agent.py):
request ``{"id": N, "op": "begin", "args": {...}}``, reply ``{"id": N, "ok": true, "result": {...}}`` or
``{"id": N, "ok": false, "error": {"class": "Refused", "exit_code": 5, "message": "..."}}``.
The agent runs as the stdio of a per-target command (default ``ssh -o BatchMode=yes
-o StrictHostKeyChecking=yes root@LINK rcopy agent``); each link of the target is tried in order until
one answers ``hello``. A link whose host key ssh refuses (unknown or changed) is a HostKeyUnknown /
HostKeyChanged (AuthFailed, exit 20) naming the fix, when no other link answers. Closing the channel
closes the agent's stdin: an agent with an uncommitted sync then promotes its rollback snapshots.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import os
import shlex
import threading
from typing import Callable

from rcopy import errors as E
from rcopy.model import SSH_CONTROL_DIR, Target
from rcopy.sys.channel import Channel, ChannelClosed

log = logging.getLogger("rcopy.peer")

PROTOCOL = 1
# A dead link is caught by ssh itself (ConnectTimeout, ServerAlive* in Target.DEFAULT_AGENT) and ends the
# channel at once; these timeouts only guard against a live agent that stays silent. The agent answers
# hello only after its own recovery (a dm-snapshot merge took 12-24 s in the TCG lab, plus ~3 s of ssh
# login), and abort rolls back before it answers, so neither may be short (30 s failed in the lab).
HELLO_TIMEOUT = 300.0
ABORT_TIMEOUT = 300.0
CALL_TIMEOUT = 3600.0     # begin snapshots every secondary; a full copy-based snapshot can take long
# A batch of digests is 16 MiB read on the backup: a disk slower than ~0.3 MB/s is stuck, and the
# heartbeat waits behind the answer, so a hung backup must not hold it for CALL_TIMEOUT.
DIGESTS_TIMEOUT = 60.0
TIDY_TIMEOUT = 300.0      # an lvremove and an lvchange after the commit; the sync is committed already


class TargetUnreachable(E.LinkError):
    """target {target} is unreachable on every link ({detail}): check the links and the agent command"""


class HostKeyUnknown(E.AuthFailed):
    """target {target}: ssh knows no host key for link {link} and rcopy accepts none blindly: check its fingerprint on {target} (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then run 'ssh-keyscan -H {link} >> /root/.ssh/known_hosts'"""


class HostKeyChanged(E.AuthFailed):
    """target {target}: the host key of link {link} has CHANGED and ssh refuses it (a reinstalled {target}, or someone in between): check the new fingerprint on {target}, then run 'ssh-keygen -R {link}' and 'ssh-keyscan -H {link} >> /root/.ssh/known_hosts'"""


HOST_KEY_ERRORS = {"unknown": HostKeyUnknown, "changed": HostKeyChanged}


class AgentProtocolError(E.PeerError):
    """target {target}: the agent's answer is not rcopy's protocol ({detail}): is rcopy {version} installed there?"""


class Pending:
    """A request sent whose answer is read later (``Peer.request``)."""

    def __init__(self, peer: "Peer", rid: int, timeout: float):
        self.peer, self.rid, self.timeout = peer, rid, timeout
        self.done, self.value, self.error = False, None, None

    def result(self):
        with self.peer.lock:
            if self.peer._pending is self:
                self.peer._settle()
        if not self.done:
            raise TargetUnreachable(target=self.peer.target.name, detail="the channel closed before the answer")
        if self.error is not None:
            raise self.error
        return self.value


class Peer:
    """A live channel to one target's agent. Use as a context manager; ``link`` is the link in use."""

    def __init__(self, target: Target, *, system: str = "", wait: bool = True):
        """Start the agent on the first link and send hello. With ``wait`` (the default) read its answer
        now, trying the other links in turn; without, the answer is read by ``ready`` (or the first
        request): the caller does its own local work while ssh logs in and the agent starts, which
        is most of a quiet sync's time in the lab."""
        self.target, self.system = target, system
        # One request at a time on the channel, whoever asks: the engine's main thread, its heartbeat
        # thread, and send workers asking for digests (rcopy.changes.digest). Held from a request until
        # it is sent, and while an answer is read; a reply read by another thread is kept in its Pending.
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        self.channel: Channel | None = None
        self.link = ""
        # (file, key file, PEM) of this session's client certificate, made on first use by ``certify``
        # (a sync that only confirms its sync point never makes one)
        self._client_cert: tuple[str, str, str] | None = None
        self.certify = None
        self._pending: Pending | None = None
        self._open_sync = False       # a begin the agent has not answered commit or abort for
        self.lost_links: dict[str, str] = {}     # link -> why: the control channel moved off it mid-sync
        self._hello: Pending | E.RcopyError | None = None    # the first link's hello, not yet read
        if wait:
            self._connect(target.links)
        elif target.links:
            try:
                self._hello = self._start(target.links[0])
            except E.RcopyError as e:
                self._hello = e

    def ready(self) -> "Peer":
        """Read the hello started by ``Peer(wait=False)``; on failure go on to the target's other links."""
        with self.lock:
            if self._hello is not None:
                first, self._hello = self._hello, None
                self._connect(self.target.links, first=first)
        return self

    def _start(self, link: str) -> Pending:
        """Spawn the agent command of ``link`` and send hello (not waiting for the answer)."""
        target = self.target
        if target.ssh_persist:
            try:                # without it ssh warns and goes on unshared: never a reason to fail
                os.makedirs(SSH_CONTROL_DIR, mode=0o700, exist_ok=True)
            except OSError as e:
                log.debug("no %s for ssh's shared connections: %s", SSH_CONTROL_DIR, e)
        self.channel = Channel(shlex.split(target.agent_command(link)))
        self.link = link
        return self._send("hello", HELLO_TIMEOUT, dict(protocol=PROTOCOL, peer=self.system,
                                                       idle_timeout=target.target_timeout))

    def _connect(self, links, first: Pending | E.RcopyError | None = None) -> None:
        """The channel on the first of ``links`` whose agent answers hello; ``first``: the first link's
        hello already sent (or the error starting it raised)."""
        target, failures, refused = self.target, [], []
        for i, link in enumerate(links):
            try:
                if i == 0 and first is not None:
                    if isinstance(first, E.RcopyError):
                        raise first
                    self.hello = first.result()
                else:
                    self.hello = self._start(link).result()
                break
            except E.LinkError as e:
                failures.append(f"{link}: {e}")
                if isinstance(e, ChannelClosed) and e.host_key:
                    refused.append(HOST_KEY_ERRORS[e.host_key](target=target.name, link=link))
                self.close(wait=True)
            except E.ToolError as e:
                failures.append(f"{link}: {e}")
                self.close(wait=True)
        else:
            if refused:         # the administrator's to fix: not a dead link that auto_recover retries
                raise refused[0]
            raise TargetUnreachable(target=target.name, detail="; ".join(failures) or "no links")
        for r in refused:
            log.warning("%s (reached it on link %s)", r, self.link)

    @property
    def client_cert(self) -> tuple[str, str, str] | None:
        if self._client_cert is None and self.certify is not None:
            self._client_cert = self.certify()
        return self._client_cert

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reattach(self, group: str, sync_id: str, why: str, *, settled: bool = False) -> str:
        """The control channel's link went silent mid-sync (``why``): reach the agent over another link
        and have it hand this new channel to the agent serving the sync, which keeps its exports (the
        data goes on over the links still up) and its rollback point. Returns the link now in use;
        raises if no other link answers or the sync is no longer in flight there (it rolled back), or,
        with ``settled``, keeps the new channel then (a commit asked again learns what became of it; a
        begin that never arrived is served by the new agent).
        No ``sync_id``: nothing of this session is in flight there (the link went between hello and
        begin): the new channel is simply the one in use."""
        with self.lock:
            return self._reattach(group, sync_id, why, settled=settled)

    def _reattach(self, group: str, sync_id: str, why: str, *, settled: bool) -> str:
        old, dead = self.channel, self.link
        others = [link for link in self.target.links if link != dead]
        self.channel, self._pending = None, None
        try:
            if not others:
                raise TargetUnreachable(target=self.target.name, detail=f"{dead} is its only link")
            self._connect(others)
            try:
                if sync_id:
                    self.call("attach", group=group, sync_id=sync_id)
            except E.StateError:
                if not settled:
                    raise
        except E.RcopyError:
            self.close(wait=False)
            raise
        finally:
            if old is not None:
                old.close(wait=False)            # its agent no longer reads it: nothing to wait for
        self.lost_links[dead] = why
        return self.link

    def close(self, *, wait: bool | None = None):
        """Close the channel. By default wait for the agent to exit (or kill it after a while) only when
        its EOF has a sync to roll back; a connect that failed always reaps what it started."""
        with self.lock:
            self._close(wait)

    def _close(self, wait: bool | None):
        if self.channel is not None:
            if wait is None:
                wait = self._open_sync or (self._pending is not None and not self._pending.done
                                           and self._hello is None)     # an unread hello has nothing to undo
            self.channel.close(wait=wait)
            self.channel = None

    def call(self, op: str, *, timeout: float = CALL_TIMEOUT, **args):
        return self.request(op, timeout=timeout, **args).result()

    def request(self, op: str, *, timeout: float = CALL_TIMEOUT, **args) -> "Pending":
        """Send a request now and answer later: the primary cuts while the backup begins. At most one
        request is outstanding: the next request (or ``result``) reads the previous answer first."""
        with self.lock:
            self.ready()
            self._settle()
            return self._send(op, timeout, args)

    def _send(self, op: str, timeout: float, args: dict) -> "Pending":
        if self.channel is None:
            raise TargetUnreachable(target=self.target.name, detail="the channel was closed")
        rid = next(self._ids)
        self.channel.send(json.dumps({"id": rid, "op": op, "args": args}))
        self._pending = Pending(self, rid, timeout)
        return self._pending

    def _settle(self) -> None:
        p, self._pending = self._pending, None
        if p is None or p.done:
            return
        p.done = True
        try:
            p.value = self._reply(p.rid, p.timeout)
        except E.RcopyError as e:
            p.error = e

    def _reply(self, rid: int, timeout: float):
        if self.channel is None:
            raise TargetUnreachable(target=self.target.name, detail="the channel was closed")
        while True:
            line = self.channel.receive(timeout)
            try:
                reply = json.loads(line)
                ok = reply["ok"]
                if isinstance(reply.get("id"), int) and reply["id"] < rid:
                    # the late answer to a request given up on (its timeout passed): not this one's
                    log.debug("skipped the late answer to request %s", reply["id"])
                    continue
                if reply.get("id") != rid:
                    raise ValueError(f"reply id {reply.get('id')} for request {rid}")
            except (ValueError, KeyError, TypeError) as e:
                raise AgentProtocolError(target=self.target.name, detail=f"{e}: {line[:80]!r}",
                                         version=PROTOCOL) from None
            break
        if ok:
            return reply.get("result")
        err = reply.get("error") or {}
        cls = E.by_name(err.get("class", ""), int(err.get("exit_code", 11)))
        raise cls(f"target {self.target.name}: {err.get('message', 'unknown error')}")

    # -- the operations the engine and the CLI use (agent.py documents each) --------------------------
    def status(self, group: str) -> dict:
        return self.call("status", group=group)

    def begin_start(self, group, generation, sync_id, base_generation, base_id, remotes, bind):
        """Send ``begin``; returns the function that waits for its answer. ``client_cert`` (made by the
        session's ``certify``: certificate file, key file, PEM) goes to the backup, which admits only
        its holder to the export; the files are what the NBD client presents."""
        cert = self.client_cert
        self._open_sync = True
        pending = self.request("begin", group=group, generation=generation, sync_id=sync_id,
                               base_generation=base_generation, base_id=base_id, remotes=remotes, bind=bind,
                               client_cert=cert[2] if cert else "", links=list(self.target.links))

        def answer() -> dict:
            res = pending.result()
            for v in res.get("volumes", {}).values():
                if cert:
                    v["export"]["client_cert"] = [cert[0], cert[1]]
            return res
        return answer

    def commit(self, group, generation, sync_id) -> dict:
        res = self.call("commit", group=group, generation=generation, sync_id=sync_id)
        self._open_sync = False
        return res

    def tidy(self, group: str) -> Callable[[], dict]:
        """Ask for the backup's tidy-up after a commit that announced one (R deleted, secondaries
        read-only again; it runs meanwhile); returns what waits for its answer: the sync's commands there."""
        return self.request("tidy", group=group, timeout=TIDY_TIMEOUT).result

    def abort(self, group, generation, sync_id, reason) -> dict:
        # short: on a dead link the agent rolls back by itself (EOF, or its idle timeout)
        res = self.call("abort", group=group, generation=generation, sync_id=sync_id, reason=reason,
                        timeout=ABORT_TIMEOUT)
        self._open_sync = False
        return res

    def digests(self, group: str, sync_id: str, remote: str, spans) -> Callable[[], bytes]:
        """Ask for the digests of the blocks of ``spans`` of secondary ``remote`` (rcopy.changes.digest);
        returns what waits for them. The caller hashes its own side meanwhile."""
        pending = self.request("digests", group=group, sync_id=sync_id, remote=remote,
                               spans=[list(s) for s in spans], timeout=max(DIGESTS_TIMEOUT, self.target.link_timeout))

        def answer() -> bytes:
            res = pending.result()
            try:
                return base64.b64decode(res["digests"], validate=True)
            except (KeyError, TypeError, binascii.Error) as e:
                raise AgentProtocolError(target=self.target.name, detail=f"digests: {e}", version=PROTOCOL) from None
        return answer

    def ping(self) -> dict:
        """The heartbeat: a link that stays silent for the target's link timeout is down."""
        return self.call("ping", timeout=self.target.link_timeout)
