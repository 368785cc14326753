"""The engine's Sender port over NBD: write the extents of a source volume to the backup's export.

Extents are coalesced (adjacent ones merged, never across data/zero), widened to the server's minimum
block size, split at the request cap, and dealt over one connection or, where the server advertises
multi-conn, several (one writer thread each, so reading the source and sending overlap). Large data
requests go from the source to the socket with sendfile (plain connections) or os.preadv into a reusable
buffer (TLS); small ones are read with os.pread and batched. Never mmap: a read error on the snapshot
must be an exception (a volume marked stale), not a SIGBUS. Zero extents go as WRITE_ZEROES. The send returns only after
every request was acknowledged and FLUSH succeeded on every connection.

HAZARD: widening a ZERO extent to block alignment would zero bytes the change source did not mark; the
unaligned edges of a zero extent are therefore sent as data read from the source (which holds those
bytes), and only the aligned middle as WRITE_ZEROES.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
from typing import Callable, Iterable, Iterator, NamedTuple

from rcopy.ports import ExportInfo
from rcopy.errors import DeviceError, RcopyError, Refused, StateError
from rcopy.extent import Extent, coalesce
from rcopy.sys.blockio import ReadError, ShortRead, read_exactly
from rcopy.transport.client import DEFAULT_FLUSH_TIMEOUT, DEFAULT_TIMEOUT, NbdClient
from rcopy.transport.handshake import Geometry
from rcopy.transport.nbd_errors import PayloadSourceError

_SMALL = 256 << 10              # data requests up to this size are read into fresh bytes and batched
_ZERO_CAP = 1 << 30             # WRITE_ZEROES carries no payload; keep its length well inside uint32
_DEAL = 32 << 20                # about the bytes of large requests a connection takes from the plan at once
_HAND_BACK_MAX = 4096           # pieces a connection may hold unacknowledged before it drains (failover)


class SourceReadError(DeviceError):
    """reading {path} at offset {offset} failed: {msg}; the snapshot is unreadable, mark the volume stale"""


class PlaintextRefused(Refused):
    """the backup offered a plaintext NBD export on {host}: refusing to send data unencrypted off loopback"""


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


class BadExtentList(RcopyError):
    """the extent list to send is not sorted and disjoint ({msg}): a bug in the change source; nothing was committed"""


class ExtentBeyondExport(StateError):
    """extent {offset}+{length} ends beyond the export ({size} bytes): the source and the secondary differ in size"""


class ExportMismatch(StateError):
    """export {name!r} on {where} is {got} bytes (expected {want}) or not writable: {msg}"""


class Piece(NamedTuple):
    """One NBD request: data from the source, or zeroes (a tuple: the delta path makes millions)."""

    offset: int
    length: int
    zero: bool


def plan(extents: Iterable[Extent], geo: Geometry, *, max_request: int = 1 << 20,
         gap: int = 0, write_align: int = 0) -> Iterator[Piece]:
    """Turn sorted extents into aligned, capped requests that respect the server's block sizes (and the
    secondary's ``write_align``: extents closer than that are merged, so no block is written twice)."""
    align = max(1, geo.min_block, write_align)
    gap = max(gap, write_align)
    if write_align:         # a zero run short of whole blocks is written as data, merged with its neighbours
        extents = (Extent(e.offset, e.length) if e.zero and (e.offset % align or e.length % align) else e
                   for e in extents)
    cap = max(align, min(geo.max_payload, max_request) // align * align)
    zcap = _ZERO_CAP // align * align
    size = geo.size
    try:
        # capped like the scanner's runs: the plan streams, it never waits for the end of a long run
        yield from _plan(coalesce(extents, gap=gap, max_length=_DEAL), align, cap, zcap, size)
    except ValueError as e:         # coalesce's check: unsorted or overlapping input
        raise BadExtentList(str(e)) from None


def _plan(runs: Iterator[Extent], align: int, cap: int, zcap: int, size: int) -> Iterator[Piece]:
    for e in runs:
        off, end = e.offset, e.offset + e.length
        if end > size:
            raise ExtentBeyondExport(offset=off, length=e.length, size=size)
        if not e.zero:
            if off % align == 0 and end % align == 0 and e.length <= cap:
                yield Piece(off, e.length, False)          # the common case, kept cheap
                continue
            yield from _split(off // align * align, min(-(-end // align) * align, size), cap, False)
            continue
        zstart, zend = -(-off // align) * align, end // align * align
        if zstart >= zend:
            yield from _split(off // align * align, min(-(-end // align) * align, size), cap, False)
            continue
        if zstart > off:
            yield Piece(zstart - align, align, False)
        yield from _split(zstart, zend, zcap, True)
        if zend < end:
            yield Piece(zend, min(align, size - zend), False)


def _split(start: int, end: int, cap: int, zero: bool) -> Iterator[Piece]:
    while start < end:
        n = min(cap, end - start)
        yield Piece(start, n, zero)
        start += n


class _Dealer:
    """Hands out the plan to connection threads in slices of about _DEAL bytes; stops on first failure."""

    def __init__(self, pieces: Iterator[Piece], on_more: Callable[[], None] | None = None):
        self._it = pieces
        self._lock = threading.Lock()
        self.stopped = False
        self.exhausted = False          # every piece has been handed out
        self._deals = 0
        self.on_more = on_more          # called once, when a second slice is dealt (the plan is long)

    def take(self) -> list[Piece]:
        with self._lock:
            if self.stopped:
                return []
            out = list(itertools.islice(self._it, 8))
            if not out:
                self.exhausted = True
            elif sum(p[1] for p in out if not p[2]) <= _DEAL // 64:
                out += itertools.islice(self._it, 1016)     # small requests: deal many at once
            if out:
                self._deals += 1
            more = self.on_more if out and self._deals == 2 else None
        if more is not None:
            more()
        return out


@dataclasses.dataclass
class NbdSender:
    """Implements rcopy.ports.Sender. ``connections`` is used only where the server allows
    multi-conn; ``gap`` bridges data extents closer than that many bytes (redundant but correct bytes).

    Several links (an export with ``more`` addresses, multi-conn): the connections are spread over the
    links, at least one per link. A connection whose link is lost hands back every request it took
    since it last had nothing in flight, the others send them again (the same bytes from the same
    snapshot: a duplicate that lands late writes what is already there), and that link is not used
    again by this sender (``lost_links``); the send fails only when no connection is left. Without
    multi-conn a flush on one connection does not cover another's writes, so there is no such
    failover: the link's loss fails the send as before."""

    connections: int = 2
    timeout: float = DEFAULT_TIMEOUT
    # 1 MiB requests beat 4 MiB ones by ~1.5x into both nbdkit and qemu-nbd on this host (a server
    # starts writing a request only once all of it arrived; smaller ones overlap better).
    max_request: int = 1 << 20
    max_in_flight: int = 64
    gap: int = 0
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT

    _live: set = dataclasses.field(default_factory=set, repr=False, compare=False)
    _live_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)
    # host -> why: links this sender lost (the session marks them down and raises link_down)
    lost_links: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    used_links: set = dataclasses.field(default_factory=set, repr=False, compare=False)   # hosts that carried a send
    _cancelled: str = dataclasses.field(default="", repr=False, compare=False)
    # export name -> its first connection, opening or open since prepare() (taken by send())
    _ready: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def prepare(self, exports: Iterable[ExportInfo]) -> None:
        """Open the first connection to each export now, each in a thread of its own, for the sends to
        come. NBD binds a connection to one export, so a sync's volumes cannot share one; what costs is
        the handshake (TCP, TLS, NBD options: ~0.35 s each in the TCG lab), and opened here it overlaps
        the change scan that precedes each volume's send (thin_delta, a COW table). ``send`` takes the
        export's connection (or raises the error its opening met); ``release`` closes those not taken."""
        for export in exports:
            if export.name in self._ready:
                continue
            o = _Opening(export)
            self._ready[export.name] = o
            threading.Thread(target=self._prefetch, args=(o,), name="nbd-prepare", daemon=True).start()

    def _prefetch(self, o: "_Opening") -> None:
        try:
            client = self._open_first(o.export)
        except BaseException as e:                  # the send that takes it raises it
            o.error = e
        else:
            with self._live_lock:
                dropped = o.dropped
                if not dropped:
                    o.client = client
            if dropped:                             # released while it opened: nobody will take it
                self._forget(client)
        finally:
            o.done.set()

    def _take(self, export: ExportInfo) -> NbdClient:
        """The export's first connection: the one prepare() opened for it, or a new one."""
        o = self._ready.pop(export.name, None)
        if o is None or o.export != export:
            if o is not None:
                self._drop(o)
            return self._open_first(export)
        o.done.wait()
        if o.error is not None:
            raise o.error
        return o.client

    def _drop(self, o: "_Opening") -> None:
        with self._live_lock:
            o.dropped, client, o.client = True, o.client, None
        if client is not None:
            self._forget(client)

    def release(self) -> None:
        """Close every connection prepare() opened that no send took (a volume skipped, a sync aborted).
        One still opening is closed by its own thread once open: nothing waits for a slow link here."""
        ready, self._ready = self._ready, {}
        for o in ready.values():
            self._drop(o)

    def cancel(self, reason: str) -> None:
        """Fail every send in progress now (the link is known to be down): no one waits out a timeout."""
        self._cancelled = reason
        with self._live_lock:
            live = list(self._live)
        for c in live:
            c.abort(reason)

    def _lose(self, host: str, err: BaseException) -> None:
        """Link ``host`` is gone: no new connection there, and every live one there fails now."""
        with self._live_lock:
            if host in self.lost_links:
                return
            self.lost_links[host] = str(err)
            live = [c for c in self._live if c.host == host]
        for c in live:
            c.abort(f"link {host} lost: {err}")

    def _open(self, export: ExportInfo, host: str | None = None, port: int | None = None) -> NbdClient:
        host, port = (host, port) if host is not None else (export.host, export.port)
        if export.tls_cert_pem is None and not _loopback(host):
            raise PlaintextRefused(host=host)
        c = NbdClient(host, port, export.name, tls_cert_pem=export.tls_cert_pem,
                      timeout=self.timeout, max_in_flight=self.max_in_flight, flush_timeout=self.flush_timeout,
                      client_cert=tuple(export.client_cert) if export.client_cert else None)
        with self._live_lock:
            self._live.add(c)
        return c

    def _open_first(self, export: ExportInfo) -> NbdClient:
        """The first connection: on the first link not known lost; a link that does not answer is lost
        and the next is tried (the last one's error is the send's)."""
        addresses = [a for a in export.addresses if a[0] not in self.lost_links] or list(export.addresses)
        for i, (host, port) in enumerate(addresses):
            try:
                return self._open(export, host, port)
            except RcopyError as e:
                if e.kind != "link" or i == len(addresses) - 1 or self._cancelled:
                    raise
                self._lose(host, e)
        raise AssertionError("unreachable")

    def _more(self, export: ExportInfo, first: NbdClient) -> list[tuple[str, int]]:
        """Where the other connections of a multi-conn export go: spread over its links not known lost,
        the first's link included, at least one per link."""
        links = [(first.host, first.port),
                 *(a for a in export.addresses if a[0] not in self.lost_links and a[0] != first.host)]
        return [links[i % len(links)] for i in range(1, max(self.connections, len(links)))]

    def _forget(self, c: NbdClient) -> None:
        c.close()
        with self._live_lock:
            self._live.discard(c)

    def send(self, source_path: str, extents: Iterable[Extent], export: ExportInfo, progress=None) -> int:
        """Write the extents, flush, and return the payload bytes sent. ``progress(n)`` is called with
        the bytes of extents (data and zeroes) the server has acknowledged so far."""
        clients = [self._take(export)]
        try:
            geo = clients[0].geometry
            if geo.size != export.size or geo.readonly:
                raise ExportMismatch("refusing to write", name=export.name, where=clients[0].where,
                                     got=geo.size, want=export.size)
            more = self._more(export, clients[0]) if geo.can_multi_conn else []
            try:
                fd = os.open(source_path, os.O_RDONLY)
            except OSError as e:
                raise SourceReadError(e.strerror, path=source_path, offset=0) from None
            try:
                alive = self._run(clients, more, export, fd, source_path,
                                  plan(extents, geo, max_request=self.max_request, gap=self.gap,
                                       write_align=export.write_align), progress)
            finally:
                os.close(fd)
            alive = self._flush(alive, failover=bool(more))
            self.used_links.update(c.host for c in alive)
            if progress:
                progress(sum(c.acked_bytes for c in clients))
            return sum(c.sent_payload for c in clients)
        finally:
            for c in list(clients):
                self._forget(c)

    def _flush(self, alive: list[NbdClient], *, failover: bool) -> list[NbdClient]:
        """FLUSH every connection left; returns those that flushed. Every request was acknowledged
        before this (each writer drained), and on a multi-conn export a FLUSH on one connection makes
        every acknowledged write durable, whichever connection carried it: so with ``failover`` a link
        lost now (another volume's connection there timed out, or this one) costs nothing as long as
        one connection flushes."""
        flushed, lost = [], None
        for c in alive:
            try:
                c.flush()
                flushed.append(c)
            except RcopyError as e:
                if not (failover and e.kind == "link" and not self._cancelled):
                    raise
                lost = e
                self._lose(c.host, e)
        if not flushed:
            raise lost
        return flushed

    def _run(self, clients: list[NbdClient], more: list[tuple[str, int]], export: ExportInfo, fd, path,
             pieces, progress) -> list[NbdClient]:
        """Send the plan over ``clients`` plus a connection to each of ``more``, each opened by its own
        thread while the others already send: a link that does not answer delays nobody (its thread is
        left behind once the plan is done, and closes what it opens late). Returns the connections
        still up. In rounds (multi-conn only, ``more`` given): a connection that loses its link hands
        back what it took, the next round deals that to the rest.

        Those of ``more`` on the first connection's own link open only once a second slice of the plan
        is dealt: a delta that fits one slice is sent before their handshakes end, which then only take
        CPU from the send (measured in the one-vCPU lab: 0.5-0.8 s of TLS per extra connection while a
        50-block delta sent in 1.2-1.5 s). Those on other links open at once: they are what survives
        the loss of the first's link."""
        failover = bool(more)
        alive = list(clients)
        lock = threading.Lock()
        first = True
        while True:
            ws = more if first else []
            openers, later = [], []
            r = _Round(_Dealer(pieces))
            r.dealer.on_more = functools.partial(self._start, r, lock, later)    # this round's, bound now
            ctx = (lock, clients, alive, export, fd, path, failover)
            # One writer thread per connection, even for one: this thread reports progress meanwhile.
            r.working = [threading.Thread(target=self._work, args=(r, c, None, ctx), name="nbd-send",
                                          daemon=True) for c in alive]
            for w in ws:
                openers.append(threading.Thread(target=self._work, args=(r, None, w, ctx), name="nbd-open",
                                                daemon=True))
                if w[0] == clients[0].host:
                    later.append(openers[-1])
            first = False
            for t in r.working + [t for t in openers if t not in later]:
                t.start()
            while True:
                with lock:
                    busy = [t for t in r.working if t.is_alive()]
                    opening = [t for t in openers if t.is_alive() and t not in r.working]
                    if not busy and (not opening or r.dealer.exhausted or r.dealer.stopped):
                        r.over = True               # openers still connecting are left behind
                        break
                (busy or opening)[0].join(0.25)
                if progress:
                    progress(sum(c.acked_bytes for c in clients))
            if r.errors:
                # A lost link is what the engine retries on: report it before secondary failures.
                r.errors.sort(key=lambda e: not (isinstance(e, RcopyError) and e.kind == "link"))
                raise r.errors[0]
            with lock:
                gone = {c for c, _ in r.lost}
                alive[:] = [c for c in alive if c not in gone]
                if not alive:                       # never report success for pieces nobody sent
                    raise r.lost[0][1]
                if not r.handed_back:
                    return list(alive)
            pieces = iter(sorted(set(r.handed_back)))

    @staticmethod
    def _start(r: "_Round", lock: threading.Lock, threads: list[threading.Thread]) -> None:
        with lock:
            if not r.over:
                for t in threads:
                    t.start()

    def _work(self, r: "_Round", client: NbdClient | None, where: tuple[str, int] | None, ctx) -> None:
        """A connection's thread in round ``r``: open it first when ``where`` is given, then send what
        the dealer hands out. Failures go to ``r``; a survivable lost link hands back what it took."""
        lock, clients, alive, export, fd, path, failover = ctx
        if client is None:
            try:
                client = self._open(export, *where)
            except BaseException as e:
                with lock:
                    if r.over:                      # too late to matter: the plan went without it
                        return
                if isinstance(e, RcopyError) and e.kind == "link" and not self._cancelled:
                    self._lose(where[0], e)         # no connection there: the others do its share
                else:
                    r.dealer.stopped = True
                    r.errors.append(e)
                return
            with lock:
                if r.over:                          # too late: the plan was sent without it
                    self._forget(client)
                    return
                clients.append(client)
                alive.append(client)
                r.working.append(threading.current_thread())
        taken: list[Piece] = []
        try:
            _pump(client, r.dealer, fd, path, taken)
            client.drain()
        except BaseException as e:                  # handed to the calling thread
            with lock:
                survivable = (failover and isinstance(e, RcopyError) and e.kind == "link"
                              and not self._cancelled and len(alive) - len(r.lost) > 1)
                if survivable:
                    r.lost.append((client, e))
                    r.handed_back.extend(taken)
            if survivable:
                self._lose(client.host, e)
                return
            r.dealer.stopped = True
            r.errors.append(e)


class _Opening:
    """One export's first connection being opened ahead of its send (NbdSender.prepare)."""

    def __init__(self, export: ExportInfo):
        self.export = export
        self.done = threading.Event()
        self.client: NbdClient | None = None
        self.error: BaseException | None = None
        self.dropped = False


@dataclasses.dataclass
class _Round:
    """One pass of the plan over the connections (the first, or one that resends what a lost link held)."""

    dealer: _Dealer
    working: list = dataclasses.field(default_factory=list)       # threads that have a connection
    errors: list = dataclasses.field(default_factory=list)
    lost: list = dataclasses.field(default_factory=list)          # (client, error): links lost this round
    handed_back: list = dataclasses.field(default_factory=list)   # pieces to send again
    over: bool = False


def _pump(client: NbdClient, dealer: _Dealer, fd: int, path: str, taken: list[Piece]) -> None:
    """Send what the dealer hands out; ``taken`` holds every piece not yet known acknowledged (it is
    emptied whenever the connection has nothing in flight): what a lost link hands back."""
    big = memoryview(b"")                       # reusable read buffer, grown on first use
    write, sendfile = client.write, client.can_sendfile
    while True:
        if len(taken) >= _HAND_BACK_MAX:
            client.drain()                      # a pipeline bubble every few GiB bounds the list
        if not client.in_flight:
            taken.clear()
        pieces = dealer.take()
        if not pieces:
            return
        taken.extend(pieces)
        for offset, length, zero in pieces:
            if zero:
                client.zero(offset, length)
            elif length <= _SMALL:
                write(offset, _pread(fd, length, offset, path))
            elif sendfile:
                try:
                    client.write_from_file(offset, fd, length)
                except PayloadSourceError as e:
                    raise SourceReadError(str(e), path=path, offset=e.offset) from None
            else:
                if big.nbytes < length:
                    big = memoryview(bytearray(length))
                buf = big[:length]
                _preadv(fd, buf, offset, path)
                client.write(offset, buf, now=True)


def _pread(fd: int, length: int, offset: int, path: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise SourceReadError(e.strerror, path=path, offset=offset) from None
    if len(data) == length:
        return data
    buf = bytearray(length)
    buf[:len(data)] = data
    _preadv(fd, memoryview(buf)[len(data):], offset + len(data), path)
    return bytes(buf)


def _preadv(fd: int, buf: memoryview, offset: int, path: str) -> None:
    try:
        read_exactly(fd, buf, offset, buf.nbytes, path=path)
    except (ReadError, ShortRead) as e:
        raise SourceReadError(e.kw.get("reason", "unexpected end of file"), path=path, offset=e.kw["offset"]) from None
