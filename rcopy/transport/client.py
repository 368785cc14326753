"""A pipelined NBD client: one TCP (optionally TLS) connection, many requests in flight.

Why our own: the kernel NBD client is not on every host, a dead link must surface as an error to retry
(never a hung process), and libnbd's Python binding is not installable with pip. The protocol follows the
NBD project's doc/proto.md (fixed newstyle, NBD_OPT_GO, structured replies); the wire format is declared in
rcopy.transport.nbd_proto.

Threads: the caller's thread writes requests (small ones batched into one ``sendmsg``, large payloads
sent from the source file with ``sendfile``); a reader thread receives replies and matches them to
requests by handle. A request counts as done only when the
server acknowledged it; a write that the server failed is remembered and raised by the next call
(``drain``/``flush``/submit). Every blocking socket call has a timeout, so a dead link raises
:class:`NbdTimeout` instead of hanging.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time

from rcopy.errors import LinkError, NotFound, PeerError, Refused
from rcopy.transport import nbd_proto as P

log = logging.getLogger("rcopy.nbd")

DEFAULT_TIMEOUT = 30.0
DEFAULT_FLUSH_TIMEOUT = 300.0
DEFAULT_IN_FLIGHT = 64
_IOV_MAX = 1024
_BATCH_BYTES = 1 << 20          # send queued small requests once this much is waiting
_TLS_DIRECT = 64 << 10          # payloads this large are encrypted without joining them first
_pack_request = P.pack_request  # module globals: the per-request path avoids attribute lookups
_REQUEST_MAGIC = P.REQUEST_MAGIC


# -- errors -------------------------------------------------------------------------------------------
class NbdLinkError(LinkError):
    """NBD server {where}: {msg}"""


class NbdRefused(NbdLinkError):
    """NBD server {where} refused the connection ({msg}): is the export running on the backup?"""


class NbdConnectionLost(NbdLinkError):
    """lost the connection to NBD server {where} ({msg}): the sync will be retried when the link is back"""


class NbdTimeout(NbdLinkError):
    """NBD server {where} did not answer within {timeout} s ({msg}): the link or the server is stuck"""


class NbdExportNotFound(NotFound):
    """NBD server {where} has no export {export!r} ({msg}): check the volume is exported on the backup"""


class NbdTlsError(Refused):
    """TLS with NBD server {where} failed ({msg}): the server's certificate is not the pinned one, or TLS is off"""


class NbdProtocolError(PeerError):
    """NBD server {where} broke the protocol: {msg}"""


class NbdError(PeerError):
    """NBD server {where}: {cmd} at offset {offset} length {length} failed with {errname}: {msg}"""

    def __init__(self, msg: str = "", *, errno: int, **kw):
        self.errno = errno
        super().__init__(msg, errno=errno, errname=P.errno_name(errno), **kw)


class NbdOutOfRange(NbdError):
    """NBD server {where}: {cmd} at offset {offset} length {length} is outside the export ({errname}): {msg}"""


class PayloadSourceError(Exception):
    """The file feeding a sendfile payload failed; the caller names the file (rcopy.transport.sender)."""

    def __init__(self, msg: str, offset: int):
        super().__init__(msg)
        self.offset = offset


# errno values of sendfile(2) that come from the input file, not the socket
_SOURCE_ERRNOS = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EOVERFLOW, errno.EINVAL, errno.EBADF}


class NbdUnsupported(PeerError):
    """NBD server {where}: export {export!r} does not support {msg}"""


# -- geometry -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the handshake told us about an export."""

    size: int
    flags: int
    min_block: int = P.DEFAULT_MIN_BLOCK
    preferred_block: int = P.DEFAULT_PREFERRED_BLOCK
    max_payload: int = P.DEFAULT_MAX_PAYLOAD
    structured: bool = False
    tls: bool = False

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def readonly(self) -> bool:
        return self.has(P.TF_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return self.has(P.TF_CAN_MULTI_CONN)

    @property
    def can_zero(self) -> bool:
        return self.has(P.TF_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self.has(P.TF_SEND_FAST_ZERO)

    @property
    def can_trim(self) -> bool:
        return self.has(P.TF_SEND_TRIM)

    @property
    def can_flush(self) -> bool:
        return self.has(P.TF_SEND_FLUSH)


# -- byte streams (plain socket or TLS over memory BIOs) ------------------------------------------------
class _Link:
    """Turns socket errors into typed link errors naming the server."""

    def __init__(self, where: str, timeout: float):
        self.where, self.timeout = where, timeout

    def fail(self, exc: BaseException) -> NbdLinkError:
        if isinstance(exc, NbdLinkError):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return NbdTimeout(str(exc) or "timed out", where=self.where, timeout=self.timeout)
        if isinstance(exc, ConnectionRefusedError):
            return NbdRefused(str(exc), where=self.where)
        return NbdConnectionLost(str(exc) or type(exc).__name__, where=self.where)


class _PlainStream:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def sendv(self, bufs: list, total: int = -1) -> None:
        """Send every buffer, in order, with as few sendmsg calls as the kernel allows (``total``, the
        byte count of bufs when known, saves summing it)."""
        sendmsg = self.sock.sendmsg
        while bufs:
            chunk = bufs[:_IOV_MAX]
            if len(bufs) > _IOV_MAX or total < 0:
                total = sum(memoryview(b).nbytes for b in chunk)
            sent = sendmsg(chunk)
            bufs = bufs[_IOV_MAX:]
            if sent != total:      # a partial send: resume inside the first buffer not fully sent
                i = 0
                while sent >= memoryview(chunk[i]).nbytes:
                    sent -= memoryview(chunk[i]).nbytes
                    i += 1
                bufs = [memoryview(chunk[i])[sent:]] + chunk[i + 1:] + bufs
            total = -1

    def recv_into(self, mv) -> int:
        return self.sock.recv_into(mv)

    def close(self) -> None:
        _close_socket(self.sock)


class _TlsStream:
    """TLS over ssl.MemoryBIO so the writer and the reader thread never call into one SSL object at once.

    OpenSSL does not allow concurrent SSL_read/SSL_write on one SSL object, which an SSLSocket shared by
    two threads would do. Here the SSLObject is touched only under ``_lock``, socket I/O happens outside
    it, and ``_send_lock`` keeps TLS records on the wire in the order they were produced.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=False)
        self._lock, self._send_lock = threading.Lock(), threading.Lock()
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._push_out()
                self._pull_in()
        self._push_out()

    def _push_out(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def _pull_in(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionResetError("server closed the TLS connection")
        with self._lock:
            self._in.write(data)

    def sendv(self, bufs: list, total: int = -1) -> None:
        # Small buffers (headers, 4 KiB blocks) are joined so they share TLS records; a large payload
        # is encrypted straight from its buffer.
        with self._send_lock:
            with self._lock:
                small: list = []
                for b in bufs:
                    if memoryview(b).nbytes >= _TLS_DIRECT:
                        if small:
                            self.obj.write(b"".join(small))
                            small = []
                        self.obj.write(b)
                    else:
                        small.append(b)
                if small:
                    self.obj.write(b"".join(small))
                out = self._out.read()
            self.sock.sendall(out)

    def recv_into(self, mv) -> int:
        while True:
            try:
                with self._lock:
                    n = self.obj.read(len(mv), mv)
                if self._out.pending:
                    self._push_out()
                return n
            except ssl.SSLWantReadError:
                self._pull_in()
            except ssl.SSLZeroReturnError:
                return 0

    def peer_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def close(self) -> None:
        _close_socket(self.sock)


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def tls_context(cert_pem: str) -> ssl.SSLContext:
    """A client context trusting exactly the session's self-signed certificate (no names checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx


# -- receive buffer -------------------------------------------------------------------------------------
class _Rx:
    """A receive buffer: replies are parsed in place, READ payloads land directly in the caller's buffer."""

    def __init__(self, stream, size: int = 1 << 20):
        self.stream = stream
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.start = self.end = 0
        self.on_idle = None          # called before blocking on the socket (to publish completions)

    def need(self, n: int) -> int:
        """Make n bytes available at self.start; return that offset (the caller advances start)."""
        while self.end - self.start < n:
            if self.start and self.start + n > len(self.buf):
                self.buf[:self.end - self.start] = self.mv[self.start:self.end]
                self.end -= self.start
                self.start = 0
            if self.on_idle:
                self.on_idle()
            got = self.stream.recv_into(self.mv[self.end:])
            if not got:
                raise ConnectionResetError("server closed the connection")
            self.end += got
        return self.start

    def skip(self, n: int) -> bytes:
        out = bytearray()
        while n:
            off = self.need(min(n, 1))
            take = min(n, self.end - off)
            out += self.mv[off:off + take]
            self.start += take
            n -= take
        return bytes(out)

    def readinto(self, dest: memoryview) -> None:
        have = min(self.end - self.start, dest.nbytes)
        dest[:have] = self.mv[self.start:self.start + have]
        self.start += have
        pos = have
        while pos < dest.nbytes:
            if self.on_idle:
                self.on_idle()
            got = self.stream.recv_into(dest[pos:])
            if not got:
                raise ConnectionResetError("server closed the connection")
            pos += got


# -- requests -----------------------------------------------------------------------------------------
class _Request:
    __slots__ = ("cmd", "offset", "length", "buf", "error", "message", "done", "sync")

    def __init__(self, cmd, offset, length, buf=None, sync=False):
        self.cmd, self.offset, self.length, self.buf, self.sync = cmd, offset, length, buf, sync
        self.error = 0
        self.message = ""
        self.done = False


class NbdClient:
    """One connection to one export. Not thread-safe on the writing side: one caller thread per client."""

    def __init__(self, host: str, port: int, export: str = "", *, tls_cert_pem: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_in_flight: int = DEFAULT_IN_FLIGHT,
                 structured: bool = True, flush_timeout: float = DEFAULT_FLUSH_TIMEOUT):
        self.host, self.port, self.export = host, port, export
        self.where = f"{host}:{port}"
        self.timeout = timeout
        self.flush_timeout = max(flush_timeout, timeout)
        self._quiet_until = 0.0       # monotonic time until which a silent server is not a timeout
        self.max_in_flight = max_in_flight
        self._link = _Link(self.where, timeout)
        self._handles = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._cond = threading.Condition()
        self._submitted = 0           # written by the caller's thread only
        self._finished = 0            # written by the reader thread only (under _cond)
        self._completed: list[_Request] = []
        self._failed: list[_Request] = []
        self._dead: NbdLinkError | NbdProtocolError | None = None
        self._closing = False
        self._batch: list = []
        self._batch_bytes = 0
        self._batch_requests = 0      # requests queued but not yet on the wire
        self.acked_bytes = 0          # bytes of writes/zeroes the server acknowledged
        self.sent_payload = 0         # payload bytes written to the socket
        sock = self._connect()
        try:
            self.geometry, self._stream = self._handshake(sock, tls_cert_pem, structured)
        except BaseException:
            _close_socket(sock)
            raise
        self._rx = _Rx(self._stream)
        self._rx.on_idle = self._publish
        self._reader = threading.Thread(target=self._read_loop, name=f"nbd-rx-{self.where}", daemon=True)
        self._reader.start()

    # -- handshake ------------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise self._link.fail(e) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _handshake(self, sock, tls_cert_pem, structured):
        try:
            return self._negotiate(sock, tls_cert_pem, structured)
        except (OSError, EOFError) as e:
            if isinstance(e, ssl.SSLError):
                raise NbdTlsError(str(e), where=self.where) from None
            raise self._link.fail(e) from None

    def _negotiate(self, sock, tls_cert_pem, structured):
        plain = _PlainStream(sock)
        io = _HandshakeIO(plain)
        greet = P.SERVER_GREETING.unpack(io.recv(P.SERVER_GREETING.size))
        if greet.magic != P.NBDMAGIC or greet.ihaveopt != P.IHAVEOPT:
            raise NbdProtocolError("not a newstyle NBD server (oldstyle or not NBD at all)", where=self.where)
        if not greet.flags & P.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not speak fixed newstyle", where=self.where)
        no_zeroes = bool(greet.flags & P.FLAG_NO_ZEROES)
        cflags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
        io.send(P.CLIENT_FLAGS.pack(flags=cflags))
        stream, tls = plain, False
        if tls_cert_pem is not None:
            rtype, body = self._option(io, P.OPT_STARTTLS)
            if rtype != P.REP_ACK:
                raise NbdTlsError(f"server refused STARTTLS: {self._rep_name(rtype, body)}", where=self.where)
            stream = _TlsStream(sock, tls_context(tls_cert_pem))
            if stream.peer_der() != ssl.PEM_cert_to_DER_cert(tls_cert_pem):
                raise NbdTlsError("peer certificate differs from the pinned one", where=self.where)
            io = _HandshakeIO(stream)
            tls = True
        sr = False
        if structured:
            rtype, body = self._option(io, P.OPT_STRUCTURED_REPLY)
            sr = rtype == P.REP_ACK
        geo = self._go(io, no_zeroes)
        return dataclasses.replace(geo, structured=sr, tls=tls), stream

    def _option(self, io, opt: int, data: bytes = b""):
        """Send one option; return the final reply (type, body). REP_INFO bodies go to self._infos."""
        io.send(P.OPTION.pack(magic=P.IHAVEOPT, option=opt, length=len(data)) + data)
        self._infos = []
        while True:
            rep = P.OPTION_REPLY.unpack(io.recv(P.OPTION_REPLY.size))
            if rep.magic != P.REPLY_MAGIC or rep.option != opt:
                raise NbdProtocolError(f"bad option reply {rep}", where=self.where)
            body = io.recv(rep.length) if rep.length else b""
            if rep.type == P.REP_INFO:
                self._infos.append(body)
                continue
            return rep.type, body

    @staticmethod
    def _rep_name(rtype: int, body: bytes) -> str:
        text = body.decode(errors="replace").strip()
        return P.REP_ERR_NAMES.get(rtype, f"reply {rtype:#x}") + (f" ({text})" if text else "")

    def _go(self, io, no_zeroes: bool) -> Geometry:
        rtype, body = self._option(io, P.OPT_GO, P.go_payload(self.export))
        if rtype == P.REP_ERR_UNSUP:
            return self._export_name(io, no_zeroes)
        if rtype == P.REP_ERR_UNKNOWN:
            raise NbdExportNotFound(self._rep_name(rtype, body), where=self.where, export=self.export)
        if rtype == P.REP_ERR_TLS_REQD:
            raise NbdTlsError(self._rep_name(rtype, body), where=self.where)
        if rtype != P.REP_ACK:
            raise NbdProtocolError(f"NBD_OPT_GO for {self.export!r}: {self._rep_name(rtype, body)}",
                                   where=self.where)
        size = flags = None
        blk = {}
        for info in self._infos:
            kind = struct.unpack_from(">H", info)[0]
            if kind == P.INFO_EXPORT:
                e = P.INFO_EXPORT_BODY.unpack(info)
                size, flags = e.size, e.flags
            elif kind == P.INFO_BLOCK_SIZE:
                b = P.INFO_BLOCK_SIZE_BODY.unpack(info)
                blk = {"min_block": b.minimum, "preferred_block": b.preferred, "max_payload": b.maximum}
        if size is None:
            raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT", where=self.where)
        return Geometry(size=size, flags=flags, **blk)

    def _export_name(self, io, no_zeroes: bool) -> Geometry:
        """Old servers: NBD_OPT_EXPORT_NAME (an unknown name just closes the connection)."""
        raw = self.export.encode()
        io.send(P.OPTION.pack(magic=P.IHAVEOPT, option=P.OPT_EXPORT_NAME, length=len(raw)) + raw)
        try:
            rep = P.EXPORT_NAME_REPLY.unpack(io.recv(P.EXPORT_NAME_REPLY.size))
        except ConnectionResetError:
            raise NbdExportNotFound("server closed the connection", where=self.where,
                                    export=self.export) from None
        if not no_zeroes:
            io.recv(P.EXPORT_NAME_PAD)
        return Geometry(size=rep.size, flags=rep.flags)

    # -- writer side ----------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._failed:
            r = self._failed[0]
            raise self._request_error(r)
        if self._dead is not None:
            raise self._dead

    def _request_error(self, r: _Request) -> NbdError:
        # EINVAL/ENOSPC also mean "unaligned" or "backing store full": only a range check tells.
        cls = NbdOutOfRange if r.offset + r.length > self.geometry.size else NbdError
        return cls(r.message or "server reported an error", errno=r.error, where=self.where,
                   cmd=P.CMD_NAMES.get(r.cmd, r.cmd), offset=r.offset, length=r.length)

    def _wait_slot(self) -> None:
        if self._submitted - self._finished < self.max_in_flight:
            return
        self._send_batch()
        with self._cond:
            self._wait(lambda: self._submitted - self._finished < self.max_in_flight)

    def _wait(self, ready) -> None:
        """Wait (holding _cond) until ready() or the connection died; a dead link raises."""
        while not ready():
            if self._dead is not None:
                raise self._dead
            if (not self._cond.wait(self.timeout * 2) and not ready() and self._dead is None
                    and time.monotonic() >= self._quiet_until):
                raise NbdTimeout("no reply from the reader", where=self.where, timeout=self.timeout)

    def _queue(self, cmd: int, offset: int, length: int, flags: int = 0, payload=None, buf=None,
               sync: bool = False, now: bool = False) -> _Request:
        if self._failed or self._dead is not None:
            self._raise_if_failed()
        if self._submitted - self._finished >= self.max_in_flight:
            self._wait_slot()
        h = next(self._handles)
        req = _Request(cmd, offset, length, buf, sync)
        self._pending[h] = req
        self._submitted += 1
        self._batch_requests += 1
        batch = self._batch
        batch.append(_pack_request(_REQUEST_MAGIC, flags, cmd, h, offset, length))
        if payload is None:
            self._batch_bytes += 28
        else:
            batch.append(payload)
            self._batch_bytes += 28 + length
            self.sent_payload += length
        if now or sync or self._batch_bytes >= _BATCH_BYTES or len(batch) >= _IOV_MAX:
            self._send_batch()
        return req

    def _send_batch(self) -> None:
        if not self._batch:
            return
        bufs, total, self._batch, self._batch_bytes = self._batch, self._batch_bytes, [], 0
        self._batch_requests = 0
        try:
            self._stream.sendv(bufs, total)
        except (OSError, ssl.SSLError) as e:
            err = self._link.fail(e)
            self._die(err)
            raise self._dead from None

    def _sync(self, req: _Request) -> _Request:
        with self._cond:
            self._wait(lambda: req.done)
        if req.error:
            raise self._request_error(req)
        return req

    # -- public commands -------------------------------------------------------------------------
    def write(self, offset: int, data, *, now: bool = False) -> None:
        """Queue a WRITE. ``data`` must not change until sent: pass now=True for a buffer you reuse."""
        self._queue(P.CMD_WRITE, offset, len(data) if type(data) is bytes else memoryview(data).nbytes,
                    payload=data, now=now)

    @property
    def can_sendfile(self) -> bool:
        return isinstance(self._stream, _PlainStream)

    def write_from_file(self, offset: int, fd: int, length: int) -> None:
        """Queue a WRITE whose payload the kernel copies from fd (same offset) to the socket with
        sendfile, never through Python: a third less CPU than preadv + sendmsg for large extents.
        Plain connections only. A read error or short file raises :class:`PayloadSourceError` and kills
        the connection (the header promised bytes that cannot follow)."""
        self._queue(P.CMD_WRITE, offset, length, now=True)
        self.sent_payload += length
        sock, pos = self._stream.sock, 0
        try:
            while pos < length:
                try:
                    n = os.sendfile(sock.fileno(), fd, offset + pos, length - pos)
                except BlockingIOError:
                    n = None
                if n == 0:
                    raise PayloadSourceError(f"source ends before offset {offset + pos}", offset + pos)
                if n is None:
                    if not select.select([], [sock], [], self.timeout)[1]:
                        raise socket.timeout("sendfile: socket not writable")
                    continue
                pos += n
        except PayloadSourceError:
            self._die(NbdConnectionLost("payload interrupted by a source read error", where=self.where))
            raise
        except OSError as e:
            if e.errno in _SOURCE_ERRNOS:
                self._die(NbdConnectionLost("payload interrupted by a source read error", where=self.where))
                raise PayloadSourceError(e.strerror, offset + pos) from None
            self._die(self._link.fail(e))
            raise self._dead from None

    def pwrite(self, data, offset: int) -> None:
        """WRITE and wait for the server's acknowledgement."""
        self._sync(self._queue(P.CMD_WRITE, offset, memoryview(data).nbytes, payload=data, sync=True))

    def zero(self, offset: int, length: int, *, fast: bool = False, wait: bool = False) -> None:
        """WRITE_ZEROES (queued unless wait); fast=True sets NBD_CMD_FLAG_FAST_ZERO (fails with ENOTSUP
        instead of writing slowly). Without WRITE_ZEROES the zeroes are written as data."""
        if not self.geometry.can_zero:
            self._write_zero_data(offset, length, wait)
            return
        flags = P.CMD_FLAG_FAST_ZERO if fast and self.geometry.can_fast_zero else 0
        req = self._queue(P.CMD_WRITE_ZEROES, offset, length, flags, sync=wait)
        if wait:
            self._sync(req)

    def _write_zero_data(self, offset: int, length: int, wait: bool) -> None:
        step = min(self.geometry.max_payload, 4 << 20)
        zeroes = bytes(min(step, length))
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            req = self._queue(P.CMD_WRITE, pos, n, payload=memoryview(zeroes)[:n], sync=wait)
            if wait:
                self._sync(req)
            pos += n

    def trim(self, offset: int, length: int) -> None:
        if not self.geometry.can_trim:
            raise NbdUnsupported("trim", where=self.where, export=self.export)
        self._sync(self._queue(P.CMD_TRIM, offset, length, sync=True))

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self._sync(self._queue(P.CMD_READ, offset, length, buf=memoryview(buf), sync=True))
        return bytes(buf)

    def drain(self) -> None:
        """Send what is queued and wait until every request is acknowledged; raise the first failure."""
        self._send_batch()
        with self._cond:
            self._wait(lambda: self._submitted == self._finished)
        self._raise_if_failed()

    def flush(self) -> None:
        """Wait for every request, then FLUSH: only after this returns is the data durable. The server
        may stay silent up to flush_timeout meanwhile (writing back gigabytes of cache to a slow disk
        is legitimate; a stuck link still fails, later)."""
        self.drain()
        if self.geometry.can_flush:
            self._quiet_until = time.monotonic() + self.flush_timeout
            try:
                self._sync(self._queue(P.CMD_FLUSH, 0, 0, sync=True))
            finally:
                self._quiet_until = 0.0

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) when the link is alive; always release the socket."""
        if self._dead is None and not self._closing:
            try:
                self._send_batch()
                self._closing = True
                self._stream.sendv([P.pack_request(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0)])
            except (NbdLinkError, OSError, ssl.SSLError):
                pass
        self._closing = True
        self._stream.close()
        self._reader.join(self.timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reader side ----------------------------------------------------------------------------
    def _publish(self) -> None:
        """Hand finished requests to waiting writers (once per batch of replies, not per reply)."""
        done = self._completed
        if not done:
            return
        self._completed = []
        with self._cond:
            for r in done:
                r.done = True
                if r.error and not r.sync:
                    self._failed.append(r)
                elif r.cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) and not r.error:
                    self.acked_bytes += r.length
            self._finished += len(done)
            self._cond.notify_all()

    def _die(self, err) -> None:
        with self._cond:
            if self._dead is None:
                self._dead = err
            self._cond.notify_all()

    def _read_loop(self) -> None:
        try:
            self._read_replies()
        except NbdProtocolError as e:
            self._die(e)
        except (OSError, ssl.SSLError, EOFError) as e:
            if self._closing:
                self._die(NbdConnectionLost("connection closed", where=self.where))
            else:
                self._die(self._link.fail(e))
        except Exception as e:      # a bug here must fail the transfer, not leave writers waiting
            log.exception("NBD reply reader for %s failed", self.where)
            self._die(NbdProtocolError(f"reply reader failed: {e!r}", where=self.where))
        finally:
            self._publish()

    def _read_replies(self) -> None:
        rx = self._rx
        pending = self._pending
        simple = P.SIMPLE_REPLY.st.unpack_from
        magic_at = struct.Struct(">I").unpack_from
        buf = rx.buf                    # compaction moves bytes inside it, never replaces it
        while True:
            try:
                off = rx.need(4)
            except (socket.timeout, TimeoutError):
                on_wire = self._submitted - self._batch_requests - self._finished
                if on_wire <= 0 and not self._completed and not self._closing:
                    continue            # idle, nothing owed to us: not a timeout
                if time.monotonic() < self._quiet_until:
                    continue            # a FLUSH may take longer than any other request
                raise
            magic = magic_at(buf, off)[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                # Hot path: consume every simple reply already buffered without leaving this loop.
                off = rx.need(16)
                done = self._completed
                while True:
                    _, err, h = simple(buf, off)
                    rx.start = off = off + 16
                    req = pending.pop(h, None)
                    if req is None:
                        raise NbdProtocolError(f"reply for unknown handle {h}", where=self.where)
                    if err:
                        req.error = err
                    elif req.cmd == P.CMD_READ:
                        rx.readinto(req.buf)          # may publish: take the fresh list after
                        off, done = rx.start, self._completed
                    done.append(req)
                    if rx.end - off < 16 or magic_at(buf, off)[0] != P.SIMPLE_REPLY_MAGIC:
                        break
            elif magic == P.STRUCTURED_REPLY_MAGIC:
                self._structured_chunk()
            else:
                raise NbdProtocolError(f"bad reply magic {magic:#x}", where=self.where)

    def _structured_chunk(self) -> None:
        rx = self._rx
        off = rx.need(P.STRUCTURED_REPLY.size)
        hdr = P.STRUCTURED_REPLY.unpack(rx.buf, off)
        rx.start += P.STRUCTURED_REPLY.size
        req = self._pending.get(hdr.handle)
        if req is None:
            raise NbdProtocolError(f"structured reply for unknown handle {hdr.handle}", where=self.where)
        if hdr.type == P.REPLY_TYPE_OFFSET_DATA:
            off = rx.need(8)
            (at,) = struct.unpack_from(">Q", rx.buf, off)
            rx.start += 8
            n = hdr.length - 8
            self._check_chunk(req, at, n)
            rx.readinto(req.buf[at - req.offset:at - req.offset + n])
        elif hdr.type == P.REPLY_TYPE_OFFSET_HOLE:
            off = rx.need(P.CHUNK_HOLE.size)
            hole = P.CHUNK_HOLE.unpack(rx.buf, off)
            rx.start += P.CHUNK_HOLE.size
            self._check_chunk(req, hole.offset, hole.length)
            req.buf[hole.offset - req.offset:hole.offset - req.offset + hole.length] = bytes(hole.length)
        elif hdr.type & P.REPLY_TYPE_ERROR_BIT:
            body = rx.skip(hdr.length)
            err = P.CHUNK_ERROR.unpack(body)
            req.error = err.error or P.EIO
            req.message = body[P.CHUNK_ERROR.size:P.CHUNK_ERROR.size + err.msglen].decode(errors="replace")
        else:
            rx.skip(hdr.length)      # NONE, or a chunk type we did not ask for: ignore its body
        if hdr.flags & P.REPLY_FLAG_DONE:
            del self._pending[hdr.handle]
            self._completed.append(req)

    def _check_chunk(self, req: _Request, at: int, n: int) -> None:
        if req.cmd != P.CMD_READ or at < req.offset or at + n > req.offset + req.length:
            raise NbdProtocolError(f"chunk {at}+{n} outside request {req.offset}+{req.length}",
                                   where=self.where)


class _HandshakeIO:
    """Blocking send/receive of whole messages during option haggling (plain or TLS stream)."""

    def __init__(self, stream):
        self.stream = stream

    def send(self, data: bytes) -> None:
        self.stream.sendv([data])

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        mv = memoryview(buf)
        pos = 0
        while pos < n:
            got = self.stream.recv_into(mv[pos:])
            if not got:
                raise ConnectionResetError("server closed the connection during the handshake")
            pos += got
        return bytes(buf)
