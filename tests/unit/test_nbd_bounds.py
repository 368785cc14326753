"""Lengths a server chooses are bounded before the client reads or allocates them.

A scripted fake server (a socket thread on 127.0.0.1) claims huge lengths and then sends nothing: a
client that believed it would block until its timeout (NbdTimeout) or allocate the claimed size, so the
typed error arriving, with little memory traced, shows neither happened.
"""
from __future__ import annotations

import socket
import threading
import tracemalloc

import pytest

from rcopy.errors import PeerError
from rcopy.transport import nbd_proto as P
from rcopy.transport.client import NbdClient
from rcopy.transport.nbd_errors import NbdProtocolError, NbdReplyTooLarge

HUGE = 256 << 20                 # what a hostile server claims; a regression would allocate this much
TIMEOUT = 10.0                   # a client that waits for the claimed bytes would hit this instead


class FakeNbd:
    """A one-connection NBD server: greets (fixed newstyle, no zeroes), reads the client flags, then runs
    ``script(conn)``; whatever the script raises is kept for the test to see."""

    def __init__(self, script):
        self.script, self.error = script, None
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.sendall(P.SERVER_GREETING.pack(magic=P.NBDMAGIC, ihaveopt=P.IHAVEOPT,
                                                    flags=P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
                recv(conn, P.CLIENT_FLAGS.size)
                self.script(conn)
                while conn.recv(1 << 16):     # until the client hangs up
                    pass
        except BaseException as e:            # handed to the test at teardown
            self.error = e

    def close(self) -> None:
        self.lsock.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "fake server still running"


def recv(conn: socket.socket, n: int) -> bytes:
    data = conn.recv(n, socket.MSG_WAITALL)
    assert len(data) == n, f"client sent {len(data)} of {n} bytes"
    return data


def expect_option(conn: socket.socket, opt: int) -> None:
    o = P.OPTION.unpack(recv(conn, P.OPTION.size))
    assert (o.magic, o.option) == (P.IHAVEOPT, opt)
    if o.length:
        recv(conn, o.length)


def reply(conn: socket.socket, opt: int, rtype: int, body: bytes = b"", length: int | None = None) -> None:
    conn.sendall(P.OPTION_REPLY.pack(magic=P.REPLY_MAGIC, option=opt, type=rtype,
                                     length=len(body) if length is None else length) + body)


def go(conn: socket.socket, *infos: bytes) -> None:
    """Accept structured replies and NBD_OPT_GO for a 1 MiB writable export."""
    expect_option(conn, P.OPT_STRUCTURED_REPLY)
    reply(conn, P.OPT_STRUCTURED_REPLY, P.REP_ACK)
    expect_option(conn, P.OPT_GO)
    for info in (P.INFO_EXPORT_BODY.pack(info=P.INFO_EXPORT, size=1 << 20, flags=P.TF_HAS_FLAGS),) + infos:
        reply(conn, P.OPT_GO, P.REP_INFO, info)
    reply(conn, P.OPT_GO, P.REP_ACK)


@pytest.fixture
def fake():
    started: list[FakeNbd] = []

    def start(script) -> FakeNbd:
        started.append(FakeNbd(script))
        return started[-1]

    yield start
    for f in started:
        f.close()
        assert f.error is None, f"fake server failed: {f.error!r}"


def connect(f: FakeNbd) -> NbdClient:
    return NbdClient("127.0.0.1", f.port, "vol", timeout=TIMEOUT)


@pytest.mark.parametrize("claimed", [P.MAX_OPTION_REPLY, HUGE, 0xFFFFFFFF])
def test_oversized_option_reply_is_refused_unread(fake, claimed):
    def script(conn):
        expect_option(conn, P.OPT_STRUCTURED_REPLY)
        reply(conn, P.OPT_STRUCTURED_REPLY, P.REP_ACK, length=claimed)     # and no body follows

    f = fake(script)
    tracemalloc.start()
    try:
        with pytest.raises(NbdReplyTooLarge) as ei:
            connect(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(ei.value, NbdProtocolError) and isinstance(ei.value, PeerError)
    assert ei.value.kw["limit"] == P.MAX_OPTION_REPLY and ei.value.kw["length"] > P.MAX_OPTION_REPLY
    assert "exceeds the 65536-byte limit" in str(ei.value)
    assert peak < 1 << 20, f"{peak} bytes allocated for a {claimed}-byte claim"    # both threads count


def test_endless_info_replies_are_bounded(fake):
    def script(conn):
        expect_option(conn, P.OPT_STRUCTURED_REPLY)
        reply(conn, P.OPT_STRUCTURED_REPLY, P.REP_ACK)
        expect_option(conn, P.OPT_GO)
        try:
            for _ in range(P.MAX_OPTION_REPLY):        # far more than the bound allows
                reply(conn, P.OPT_GO, P.REP_INFO, P.INFO_EXPORT_BODY.pack(info=P.INFO_EXPORT, size=0, flags=0))
        except (BrokenPipeError, ConnectionResetError):
            pass                                        # the client gave up: what we want

    with pytest.raises(NbdReplyTooLarge):
        connect(fake(script))


@pytest.mark.parametrize("info", [
    b"\x00",                                                              # no room for the type
    P.INFO_EXPORT_BODY.pack(info=P.INFO_EXPORT, size=1, flags=0)[:6],    # truncated export info
    P.INFO_BLOCK_SIZE_BODY.pack(info=P.INFO_BLOCK_SIZE, minimum=3, preferred=4096, maximum=1 << 20),
    P.INFO_BLOCK_SIZE_BODY.pack(info=P.INFO_BLOCK_SIZE, minimum=1 << 20, preferred=1 << 20, maximum=1 << 25),
    P.INFO_BLOCK_SIZE_BODY.pack(info=P.INFO_BLOCK_SIZE, minimum=4096, preferred=4096, maximum=0),
], ids=["short", "truncated-export", "min-not-power-of-2", "min-over-64k", "max-below-min"])
def test_malformed_info_is_a_protocol_error(fake, info):
    with pytest.raises(NbdProtocolError):
        connect(fake(lambda conn: go(conn, info)))


@pytest.mark.parametrize("rtype,length,error", [
    (P.REPLY_TYPE_ERROR, HUGE, NbdReplyTooLarge),
    (P.REPLY_TYPE_NONE, HUGE, NbdReplyTooLarge),
    (P.REPLY_TYPE_OFFSET_DATA, 8 + 4096 + 1, NbdReplyTooLarge),          # more data than was asked for
    (P.REPLY_TYPE_OFFSET_HOLE, HUGE, NbdReplyTooLarge),
    (P.REPLY_TYPE_OFFSET_DATA, 4, NbdProtocolError),                      # shorter than its offset
    (P.REPLY_TYPE_ERROR, 2, NbdProtocolError),                            # shorter than error + msglen
], ids=["error-huge", "none-huge", "data-over-request", "hole-huge", "data-short", "error-short"])
def test_structured_chunk_length_is_bounded(fake, rtype, length, error):
    def script(conn):
        go(conn)
        req = P.REQUEST.unpack(recv(conn, P.REQUEST.size))
        assert (req.type, req.length) == (P.CMD_READ, 4096)
        conn.sendall(P.STRUCTURED_REPLY.pack(magic=P.STRUCTURED_REPLY_MAGIC, flags=P.REPLY_FLAG_DONE,
                                             type=rtype, handle=req.handle, length=length))

    with connect(fake(script)) as c:
        assert c.geometry.structured
        with pytest.raises(error) as ei:
            c.pread(4096, 0)
    assert not isinstance(ei.value, OSError)
