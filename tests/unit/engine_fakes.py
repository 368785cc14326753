"""In-memory fakes of the engine's ports for tests/unit/test_engine*.py (zrepl-style driver tests).

Volumes are bytearrays in a dict keyed by path; the primary and the backup each have one such dict.
The backup side is the real rcopy.app.agent.Agent over its own Store, driven in-process through
LocalPeer (same JSON round trip and error mapping as the real channel), so the two-phase commit and the
rollback are exercised for real; only snapshots, extents and the NBD wire are faked.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

from rcopy.app.agent import Agent
from rcopy.backends import Probe
from rcopy.engine.driver import Driver
from rcopy.ports import ExportInfo, Snapshot
from rcopy.errors import Busy, DeviceError, LinkError, by_name
from rcopy.extent import Extent, coalesce

BLOCK = 4096


class Crash(BaseException):
    """A process death at a fault point: nothing after it runs, no abort, no cleanup."""


class FakeSnapshotter:
    backend = "fake"

    def __init__(self, disks: dict):
        self.disks, self.snaps, self.invalid, self.calls = disks, {}, set(), []
        self.readers = Counter()    # snapshot path -> change scans holding it open (as LVM sees an open LV)

    def cut(self, requests):
        self.calls.append(("cut", tuple(requests)))
        out = []
        for origin, name in requests:
            self.snaps.setdefault((origin, name), bytes(self.disks[origin]))
            out.append(Snapshot(origin, name, f"snap:{origin}:{name}", self.backend))
        return out

    def find(self, origin, name):
        return Snapshot(origin, name, f"snap:{origin}:{name}", self.backend) if (origin, name) in self.snaps else None

    def valid(self, snap):
        return snap.name not in self.invalid

    def delete(self, snap):
        if self.readers[snap.path]:
            raise Busy(f"Logical volume {snap.name} in use")
        self.calls.append(("delete", snap.name))
        self.snaps.pop((snap.origin, snap.name), None)

    def delete_all(self, snaps):
        for snap in snaps:
            self.delete(snap)

    def rollback(self, snap):
        self.calls.append(("rollback", snap.name))
        data = self.snaps.pop((snap.origin, snap.name), None)
        if data is not None:
            self.disks[snap.origin][:] = data

    def data(self, path: str) -> bytes:
        """The bytes behind a volume or a snapshot path."""
        if path.startswith("snap:"):
            _, origin, name = path.split(":", 2)
            return self.snaps[(origin, name)]
        return bytes(self.disks[path])


def _blocks(old: bytes | None, new: bytes):
    for off in range(0, len(new), BLOCK):
        b = new[off:off + BLOCK]
        if old is not None and old[off:off + BLOCK] == b:
            continue
        yield Extent(off, len(b), zero=not any(b))


class _Scan:
    """Changed extents read from snapshots it holds open until it runs out or is closed, as the real
    scan holds its file descriptors (rcopy.changes.scan): while open, the snapshots cannot be deleted."""

    def __init__(self, snapper: FakeSnapshotter, paths, extents):
        self.snapper, self.paths, self._it, self._open = snapper, paths, iter(extents), True
        snapper.readers.update(paths)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise

    def close(self):
        if self._open:
            self._open = False
            self.snapper.readers.subtract(self.paths)


class FakeChanges:
    def __init__(self, snapper: FakeSnapshotter):
        self.snapper = snapper

    def changed(self, old, new, *, block_size=BLOCK, remote=None):
        return _Scan(self.snapper, [old.path, new.path],
                     coalesce(_blocks(self.snapper.data(old.path), self.snapper.data(new.path))))

    def unchanged_since(self, base, origin):
        """The fake compares content (the real sources know from metadata whether anything was written)."""
        return self.snapper.data(base.path) == self.snapper.data(origin)


class FakeSender:
    """Writes extents into the backup's disks; ``fail_on`` names a volume whose send loses the link."""

    def __init__(self, primary: FakeSnapshotter, backup_disks: dict, log: list):
        self.primary, self.backup, self.log = primary, backup_disks, log
        self.fail_on: str | None = None
        self.read_error_on: str | None = None          # a volume whose source read fails (EIO)
        self.payload = 0

    def send(self, source_path, extents, export, progress=None):
        data = self.primary.data(source_path)
        dest = self.backup[export.name]
        sent = 0
        for e in extents:
            if self.read_error_on and self.read_error_on in export.name:
                raise DeviceError(f"read error on {source_path} at offset {e.offset} (Input/output error)")
            if self.fail_on and self.fail_on in export.name:
                dest[e.offset:e.offset + 1] = b"\xee"      # a torn write before the link dies
                raise LinkError(f"connection to {export.host} lost")
            dest[e.offset:e.end] = bytes(e.length) if e.zero else data[e.offset:e.end]
            sent += 0 if e.zero else e.length
            if progress:
                progress(e.end)
        self.log.append(("send", export.name, sent))
        return sent


class FakeExport:
    def __init__(self, volumes: dict, bind: str, disks: dict):
        # export names are the backup's paths here, so the sender finds the disk directly
        self.infos = {name: ExportInfo(bind, 10809, path, len(disks[path])) for name, path in volumes.items()}
        self.stopped = False

    def stop(self):
        self.stopped = True


def _later(fn, *args, **kw):
    """A request answered later (rcopy.transport.peer.Pending), synchronous here: the answer is ready
    (or its error raised) when asked for."""
    try:
        res = fn(*args, **kw)
    except Exception as e:
        err = e

        def fail():
            raise err
        return fail
    return lambda: res


class LocalPeer:
    """The real Agent, in process, behind the same JSON round trip as the stdio channel."""

    def __init__(self, agent: Agent, log: list, link: str = "127.0.0.1"):
        self.agent, self.log, self.link = agent, log, link
        self.closed = False
        self.fds: list[int] = []                 # lock fds the agent took during the current call
        take = agent.store.try_lock

        def try_lock(group):
            fd = take(group)
            if fd is not None:
                self.fds.append(fd)
            return fd
        agent.store.try_lock = try_lock

    def call(self, op, **args):
        if self.closed:
            raise LinkError("channel closed")
        self.log.append(("peer", op))
        del self.fds[:]
        try:
            reply = self.agent.handle(json.loads(json.dumps({"id": 1, "op": op, "args": args})))
        except Crash:
            self._died()
            raise LinkError("the agent died (channel closed)") from None
        try:
            self.agent.tidy_up()                # as the serve loop does, once the answer is on its way
        except Crash:
            self._died()                        # after its answer: the answer still arrived
        reply = json.loads(json.dumps(reply))
        if reply["ok"]:
            return reply["result"]
        err = reply["error"]
        raise by_name(err["class"], err["exit_code"])(err["message"])

    def _died(self):
        """The agent process died: its locks go with it (those of syncs it serves or tidies, and the one
        this call took; never close other fds, their numbers may have been reused)."""
        self.closed = True
        held = {fd for fd, *_ in self.agent.active.values()} | {fd for fd, *_ in self.agent.tidying.values()}
        self.agent.tidying.clear()
        for fd in set(self.fds) | held:
            try:
                os.close(fd)
            except OSError:
                pass
        del self.agent.store.try_lock

    def status(self, group):
        return self.call("status", group=group)

    def begin(self, group, generation, sync_id, base_generation, base_id, remotes, bind):
        return self.call("begin", group=group, generation=generation, sync_id=sync_id,
                         base_generation=base_generation, base_id=base_id, remotes=remotes, bind=bind)

    def begin_start(self, *args):
        return _later(self.begin, *args)

    def commit(self, group, generation, sync_id):
        return self.call("commit", group=group, generation=generation, sync_id=sync_id)

    def tidy(self, group):
        return _later(self.call, "tidy", group=group)

    def abort(self, group, generation, sync_id, reason):
        return self.call("abort", group=group, generation=generation, sync_id=sync_id, reason=reason)

    def ping(self):
        return self.call("ping")

    def close(self):
        """The channel closes: the agent sees EOF and rolls back what is in flight."""
        if not self.closed:
            self.closed = True
            self.agent.hangup()


@dataclasses.dataclass
class FakeBackend:
    """The registry's Backend over in-memory disks (kind "fake")."""

    snapshotter: FakeSnapshotter
    name: str = "fake"

    @property
    def changes(self):
        return FakeChanges(self.snapshotter)

    def full(self, snap):
        return coalesce(_blocks(None, self.snapshotter.data(snap.path)))


def ports(snapper: FakeSnapshotter) -> dict:
    """backend/cut/delete as rcopy.backends hands them to the driver and the agent."""
    b = FakeBackend(snapper)

    def delete(requests):
        found = [s for _, o, n in requests if (s := snapper.find(o, n))]
        snapper.delete_all(found)
        return len(found)
    return {"backend": lambda kind: b, "cut": lambda reqs, idle=False: snapper.cut([(o, n) for _, o, n in reqs]),
            "delete": delete}


def make_agent(store, snapper, exporter) -> Agent:
    return Agent(store, **ports(snapper), probe=lambda path: Probe("fake", f"fake:{path}"), exporter=exporter)


def make_driver(store, peer, snapper, sender) -> Driver:
    return Driver(store, peer, **ports(snapper), sender=sender)
