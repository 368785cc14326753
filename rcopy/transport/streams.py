"""Byte streams under the NBD client: a plain socket or TLS over memory BIOs, and reading from them.

Both streams offer the same three calls (``sendv``, ``recv_into``, ``close``) so the handshake and the
pipelined client never care whether TLS is on. :func:`recv_exactly` is the transport's one "receive
until the buffer is full" loop; :class:`RecvBuffer` adds the read-ahead the reply reader parses in place.
Nothing here knows NBD: socket errors surface raw and the callers type them (rcopy.transport.nbd_errors).
"""
from __future__ import annotations

import socket
import ssl
import threading

IOV_MAX = 1024                  # most buffers one sendmsg takes
_TLS_DIRECT = 64 << 10          # payloads this large are encrypted without joining them first


class PlainStream:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def sendv(self, bufs: list, total: int = -1) -> None:
        """Send every buffer, in order, with as few sendmsg calls as the kernel allows (``total``, the
        byte count of bufs when known, saves summing it)."""
        sendmsg = self.sock.sendmsg
        while bufs:
            chunk = bufs[:IOV_MAX]
            if len(bufs) > IOV_MAX or total < 0:
                total = sum(memoryview(b).nbytes for b in chunk)
            sent = sendmsg(chunk)
            bufs = bufs[IOV_MAX:]
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
        close_socket(self.sock)


class TlsStream:
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
        close_socket(self.sock)


def close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def tls_context(cert_pem: str, client_cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A client context trusting exactly the session's self-signed certificate (no names checked),
    presenting ``client_cert`` (certificate file, key file) when the server verifies its peer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    if client_cert:
        ctx.load_cert_chain(*client_cert)
    return ctx


def recv_exactly(stream, dest: memoryview, *, on_idle=None,
                 eof: str = "server closed the connection") -> None:
    """Receive into ``dest`` until it is full. ``on_idle`` runs before each blocking receive; the peer
    closing first raises ConnectionResetError(eof), which the callers type as a lost link."""
    pos, n = 0, dest.nbytes
    while pos < n:
        if on_idle:
            on_idle()
        got = stream.recv_into(dest[pos:])
        if not got:
            raise ConnectionResetError(eof)
        pos += got


class RecvBuffer:
    """Read-ahead for the reply reader: headers are parsed in place, payloads land in the caller's buffer."""

    def __init__(self, stream, size: int = 1 << 20):
        self.stream = stream
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.start = self.end = 0
        self.on_idle = None          # called before blocking on the socket (to publish completions)

    def need(self, n: int) -> int:
        """Make n bytes available at self.start; return that offset (the caller advances start).

        Reads ahead as far as the buffer allows, so not :func:`recv_exactly`; and it counts every byte
        at once, because the reader retries a timed-out ``need`` while idle."""
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

    def readinto(self, dest: memoryview) -> None:
        """Fill dest: first from what is buffered, the rest straight from the stream."""
        have = min(self.end - self.start, dest.nbytes)
        dest[:have] = self.mv[self.start:self.start + have]
        self.start += have
        recv_exactly(self.stream, dest[have:], on_idle=self.on_idle)

    def read(self, n: int) -> bytes:
        """The next n bytes (the caller bounds n: they are allocated up front)."""
        out = bytearray(n)
        self.readinto(memoryview(out))
        return bytes(out)
