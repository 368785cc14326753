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
import itertools
import os
import threading
from typing import Iterable, Iterator, NamedTuple

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

    def __init__(self, pieces: Iterator[Piece]):
        self._it = pieces
        self._lock = threading.Lock()
        self.stopped = False

    def take(self) -> list[Piece]:
        with self._lock:
            if self.stopped:
                return []
            out = list(itertools.islice(self._it, 8))
            if out and sum(p[1] for p in out if not p[2]) <= _DEAL // 64:
                out += itertools.islice(self._it, 1016)     # small requests: deal many at once
        return out


@dataclasses.dataclass
class NbdSender:
    """Implements rcopy.ports.Sender. ``connections`` is used only where the server allows
    multi-conn; ``gap`` bridges data extents closer than that many bytes (redundant but correct bytes)."""

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

    def cancel(self, reason: str) -> None:
        """Fail every send in progress now (the link is known to be down): no one waits out a timeout."""
        with self._live_lock:
            live = list(self._live)
        for c in live:
            c.abort(reason)

    def _open(self, export: ExportInfo) -> NbdClient:
        if export.tls_cert_pem is None and not _loopback(export.host):
            raise PlaintextRefused(host=export.host)
        c = NbdClient(export.host, export.port, export.name, tls_cert_pem=export.tls_cert_pem,
                      timeout=self.timeout, max_in_flight=self.max_in_flight, flush_timeout=self.flush_timeout,
                      client_cert=tuple(export.client_cert) if export.client_cert else None)
        with self._live_lock:
            self._live.add(c)
        return c

    def send(self, source_path: str, extents: Iterable[Extent], export: ExportInfo, progress=None) -> int:
        """Write the extents, flush, and return the payload bytes sent. ``progress(n)`` is called with
        the bytes of extents (data and zeroes) the server has acknowledged so far."""
        clients = [self._open(export)]
        try:
            geo = clients[0].geometry
            if geo.size != export.size or geo.readonly:
                raise ExportMismatch("refusing to write", name=export.name, where=clients[0].where,
                                     got=geo.size, want=export.size)
            if geo.can_multi_conn:
                clients += [self._open(export) for _ in range(self.connections - 1)]
            try:
                fd = os.open(source_path, os.O_RDONLY)
            except OSError as e:
                raise SourceReadError(e.strerror, path=source_path, offset=0) from None
            try:
                self._run(clients, fd, source_path, plan(extents, geo, max_request=self.max_request,
                                                         gap=self.gap, write_align=export.write_align), progress)
            finally:
                os.close(fd)
            for c in clients:
                c.flush()
            if progress:
                progress(sum(c.acked_bytes for c in clients))
            return sum(c.sent_payload for c in clients)
        finally:
            for c in clients:
                c.close()
                with self._live_lock:
                    self._live.discard(c)

    def _run(self, clients, fd, path, pieces, progress) -> None:
        dealer = _Dealer(pieces)
        errors: list[BaseException] = []

        def work(client: NbdClient) -> None:
            try:
                _pump(client, dealer, fd, path)
                client.drain()
            except BaseException as e:          # handed to the calling thread below
                dealer.stopped = True
                errors.append(e)

        # One writer thread per connection, even for one: this thread reports progress meanwhile.
        threads = [threading.Thread(target=work, args=(c,), name="nbd-send", daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.25)
                if progress:
                    progress(sum(c.acked_bytes for c in clients))
        if errors:
            # A lost link is what the engine retries on: report it before secondary failures.
            errors.sort(key=lambda e: not (isinstance(e, RcopyError) and e.kind == "link"))
            raise errors[0]


def _pump(client: NbdClient, dealer: _Dealer, fd: int, path: str) -> None:
    big = memoryview(b"")                       # reusable read buffer, grown on first use
    write, sendfile = client.write, client.can_sendfile
    while True:
        pieces = dealer.take()
        if not pieces:
            return
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
