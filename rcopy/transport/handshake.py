"""NBD negotiation, from the TCP connect to the transmission phase (fixed newstyle, proto.md).

Greeting, client flags, optional STARTTLS with a pinned certificate, structured replies, then NBD_OPT_GO
(or NBD_OPT_EXPORT_NAME on old servers). The outcome is a :class:`Geometry` and the stream to send
requests on; a failure is a typed error and leaves no socket open. Every length the server sends here is
bounded before it is read, so a hostile server cannot make the client allocate gigabytes.
"""
from __future__ import annotations

import dataclasses
import socket
import ssl
import struct

from rcopy.transport import nbd_proto as P
from rcopy.transport.nbd_errors import (NbdClientRefused, NbdExportNotFound, NbdProtocolError, NbdTlsError,
                                        check_length, link_error)
from rcopy.transport.streams import PlainStream, TlsStream, close_socket, recv_exactly, tls_context


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


class _DroppedAfterTls(Exception):
    """The server ended the connection after a TLS handshake that pinned its certificate, before its
    first reply: nbdkit --tls-verify-peer does exactly that to a client certificate it does not admit
    (it verifies after the handshake and sends no alert; seen on nbdkit 1.32.5)."""


def open_export(host: str, port: int, export: str, *, timeout: float, tls_cert_pem: str | None = None,
                structured: bool = True, client_cert: tuple[str, str] | None = None,
                ) -> tuple[Geometry, PlainStream | TlsStream]:
    """Connect and negotiate until requests may be sent; return the export's geometry and the stream.

    A server that drops us right after TLS is asked once more: a second drop at the same point is a
    refusal of our certificate (:class:`NbdClientRefused`, never retried), not a dead link; a link that
    really died fails the second attempt some other way and stays a link error."""
    try:
        return _open_export(host, port, export, timeout, tls_cert_pem, structured, client_cert)
    except _DroppedAfterTls:
        pass
    try:
        return _open_export(host, port, export, timeout, tls_cert_pem, structured, client_cert)
    except _DroppedAfterTls as e:
        raise NbdClientRefused(str(e), where=f"{host}:{port}") from None


def _open_export(host, port, export, timeout, tls_cert_pem, structured, client_cert):
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise link_error(e, where, timeout) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return _Negotiation(where, export, PlainStream(sock)).run(tls_cert_pem, structured, client_cert)
    except (OSError, EOFError) as e:
        close_socket(sock)
        if isinstance(e, ssl.SSLError):
            raise NbdTlsError(str(e), where=where) from None
        raise link_error(e, where, timeout) from None
    except BaseException:
        close_socket(sock)
        raise


class _Negotiation:
    """One client's option haggling: blocking whole-message I/O on a plain, later maybe TLS, stream."""

    def __init__(self, where: str, export: str, stream: PlainStream):
        self.where, self.export, self.stream = where, export, stream
        self.infos: list[bytes] = []          # NBD_REP_INFO bodies of the last option
        self.tls_fresh = False                # TLS is up and the server has not answered over it yet

    def _send(self, data: bytes) -> None:
        self.stream.sendv([data])

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        recv_exactly(self.stream, memoryview(buf), eof="server closed the connection during the handshake")
        return bytes(buf)

    def run(self, tls_cert_pem: str | None, structured: bool, client_cert: tuple[str, str] | None = None,
            ) -> tuple[Geometry, PlainStream | TlsStream]:
        greet = P.SERVER_GREETING.unpack(self._recv(P.SERVER_GREETING.size))
        if greet.magic != P.NBDMAGIC or greet.ihaveopt != P.IHAVEOPT:
            raise NbdProtocolError("not a newstyle NBD server (oldstyle or not NBD at all)", where=self.where)
        if not greet.flags & P.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not speak fixed newstyle", where=self.where)
        no_zeroes = bool(greet.flags & P.FLAG_NO_ZEROES)
        cflags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
        self._send(P.CLIENT_FLAGS.pack(flags=cflags))
        tls = False
        if tls_cert_pem is not None:
            rtype, body = self._option(P.OPT_STARTTLS)
            if rtype != P.REP_ACK:
                raise NbdTlsError(f"server refused STARTTLS: {_rep_name(rtype, body)}", where=self.where)
            self.stream = TlsStream(self.stream.sock, tls_context(tls_cert_pem, client_cert))
            if self.stream.peer_der() != ssl.PEM_cert_to_DER_cert(tls_cert_pem):
                raise NbdTlsError("peer certificate differs from the pinned one", where=self.where)
            tls = self.tls_fresh = True
        try:
            sr = False
            if structured:
                rtype, body = self._option(P.OPT_STRUCTURED_REPLY)
                sr = rtype == P.REP_ACK
            geo = self._go(no_zeroes)
        except (OSError, EOFError) as e:
            if self.tls_fresh and not isinstance(e, (socket.timeout, TimeoutError)):
                raise _DroppedAfterTls(str(e) or type(e).__name__) from None
            raise
        return dataclasses.replace(geo, structured=sr, tls=tls), self.stream

    def _option(self, opt: int, data: bytes = b"") -> tuple[int, bytes]:
        """Send one option; return the final reply (type, body). REP_INFO bodies go to self.infos."""
        self._send(P.OPTION.pack(magic=P.IHAVEOPT, option=opt, length=len(data)) + data)
        self.infos = []
        total = 0                   # headers count too: endless empty NBD_REP_INFOs are bounded as well
        while True:
            rep = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
            self.tls_fresh = False
            if rep.magic != P.REPLY_MAGIC or rep.option != opt:
                raise NbdProtocolError(f"bad option reply {rep}", where=self.where)
            total += P.OPTION_REPLY.size + rep.length
            check_length(total, P.MAX_OPTION_REPLY, what=f"the reply to option {opt}", where=self.where)
            body = self._recv(rep.length) if rep.length else b""
            if rep.type == P.REP_INFO:
                self.infos.append(body)
                continue
            return rep.type, body

    def _go(self, no_zeroes: bool) -> Geometry:
        rtype, body = self._option(P.OPT_GO, P.go_payload(self.export))
        if rtype == P.REP_ERR_UNSUP:
            return self._export_name(no_zeroes)
        if rtype == P.REP_ERR_UNKNOWN:
            raise NbdExportNotFound(_rep_name(rtype, body), where=self.where, export=self.export)
        if rtype == P.REP_ERR_TLS_REQD:
            raise NbdTlsError(_rep_name(rtype, body), where=self.where)
        if rtype != P.REP_ACK:
            raise NbdProtocolError(f"NBD_OPT_GO for {self.export!r}: {_rep_name(rtype, body)}",
                                   where=self.where)
        size = flags = None
        blk = {}
        for info in self.infos:
            kind = self._info_kind(info)
            if kind == P.INFO_EXPORT:
                e = self._info_body(P.INFO_EXPORT_BODY, info)
                size, flags = e.size, e.flags
            elif kind == P.INFO_BLOCK_SIZE:
                b = self._info_body(P.INFO_BLOCK_SIZE_BODY, info)
                if not P.valid_block_sizes(b.minimum, b.maximum):
                    raise NbdProtocolError(f"block sizes minimum {b.minimum} maximum {b.maximum}: the minimum "
                                           f"must be a power of 2 up to {P.MAX_MIN_BLOCK}, the maximum no "
                                           "smaller", where=self.where)
                blk = {"min_block": b.minimum, "preferred_block": b.preferred, "max_payload": b.maximum}
        if size is None:
            raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT", where=self.where)
        return Geometry(size=size, flags=flags, **blk)

    def _info_kind(self, info: bytes) -> int:
        if len(info) < 2:
            raise NbdProtocolError(f"NBD_REP_INFO of {len(info)} bytes has no type", where=self.where)
        return struct.unpack_from(">H", info)[0]

    def _info_body(self, msg: P.Message, info: bytes):
        if len(info) < msg.size:
            raise NbdProtocolError(f"{msg.name} of {len(info)} bytes, expected {msg.size}", where=self.where)
        return msg.unpack(info)

    def _export_name(self, no_zeroes: bool) -> Geometry:
        """Old servers: NBD_OPT_EXPORT_NAME (an unknown name just closes the connection)."""
        raw = self.export.encode()
        self._send(P.OPTION.pack(magic=P.IHAVEOPT, option=P.OPT_EXPORT_NAME, length=len(raw)) + raw)
        try:
            rep = P.EXPORT_NAME_REPLY.unpack(self._recv(P.EXPORT_NAME_REPLY.size))
        except ConnectionResetError:
            raise NbdExportNotFound("server closed the connection", where=self.where,
                                    export=self.export) from None
        if not no_zeroes:
            self._recv(P.EXPORT_NAME_PAD)
        return Geometry(size=rep.size, flags=rep.flags)


def _rep_name(rtype: int, body: bytes) -> str:
    text = body.decode(errors="replace").strip()
    return P.REP_ERR_NAMES.get(rtype, f"reply {rtype:#x}") + (f" ({text})" if text else "")
