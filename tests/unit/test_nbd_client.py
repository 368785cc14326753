"""The NBD client against real servers (nbdkit memory/file, qemu-nbd, nbd-server) on 127.0.0.1."""
import hashlib
import os
import random
import socket

import pytest

from rcopy.errors import LinkError
from rcopy.sys import nbdkit
from rcopy.transport import nbd_proto as P
from rcopy.transport.client import NbdClient
from rcopy.transport.nbd_errors import (NbdConnectionLost, NbdError, NbdExportNotFound, NbdOutOfRange, NbdRefused,
                                        NbdTimeout, NbdTlsError)
from rcopy.transport.export import Export
from tests.unit.nbd_servers import MiB, kill_during, serve, server  # noqa: F401  (fixtures)


def connect(s, **kw) -> NbdClient:
    return NbdClient(s.host, s.port, s.name, **kw)


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def test_handshake_reports_export(server):
    with connect(server) as c:
        g = c.geometry
        assert g.size == server.size
        assert not g.readonly and g.can_flush and g.can_zero
        assert g.min_block >= 1 and g.max_payload >= 1 * MiB


def test_round_trip_write_read_zero_trim_flush(server):
    rnd = random.Random(1)
    with connect(server) as c:
        a, b = rnd.randbytes(3 * MiB), rnd.randbytes(64 << 10)
        c.pwrite(a, 1 * MiB)
        c.pwrite(b, 8 * MiB + 4096)
        c.zero(1 * MiB + 4096, 8192, wait=True)
        expect = bytearray(a)
        expect[4096:4096 + 8192] = bytes(8192)
        assert sha(c.pread(3 * MiB, 1 * MiB)) == sha(expect)
        assert sha(c.pread(64 << 10, 8 * MiB + 4096)) == sha(b)
        assert c.pread(1 * MiB, 12 * MiB) == bytes(1 * MiB)        # never written: zeroes (holes)
        if c.geometry.can_trim:
            c.trim(8 * MiB + 4096, 64 << 10)
            assert sha(c.pread(3 * MiB, 1 * MiB)) == sha(expect)   # trim touched nothing else
        c.flush()
    if server.path:
        with open(server.path, "rb") as f:
            f.seek(1 * MiB)
            assert sha(f.read(3 * MiB)) == sha(expect)


def test_pipelined_writes_are_all_acknowledged(server):
    """Hundreds of queued 4 KiB writes in flight at once land exactly; drain waits for every ack."""
    rnd = random.Random(2)
    blocks = sorted(rnd.sample(range(server.size // 4096), 600))
    image = bytearray(server.size)
    with connect(server, max_in_flight=32) as c:
        for blk in blocks:
            data = rnd.randbytes(4096)
            image[blk * 4096:(blk + 1) * 4096] = data
            c.write(blk * 4096, data)
        c.flush()
        assert c.acked_bytes == 600 * 4096
        assert sha(c.pread(server.size, 0)) == sha(image)


def test_zero_without_write_zeroes_writes_zero_data(serve):
    s = serve("nbdkit-memory", filters=("nozero",), params=("zeromode=none",))
    with connect(s) as c:
        assert not c.geometry.can_zero
        c.pwrite(b"\xff" * 65536, 0)
        c.zero(4096, 8192, wait=True)
        got = c.pread(65536, 0)
    assert got == b"\xff" * 4096 + bytes(8192) + b"\xff" * (65536 - 12288)


def test_fast_zero_flag_where_offered(serve):
    s = serve("qemu-nbd")
    with connect(s) as c:
        assert c.geometry.can_fast_zero
        c.pwrite(b"\x01" * 8192, 0)
        try:
            c.zero(0, 8192, fast=True, wait=True)
        except NbdError as e:          # a server may refuse a fast zero it cannot do quickly
            assert e.errno == P.ENOTSUP
            c.zero(0, 8192, wait=True)
        assert c.pread(8192, 0) == bytes(8192)


def test_write_past_end_is_out_of_range(server):
    with connect(server) as c:
        with pytest.raises(NbdOutOfRange) as ei:
            c.pwrite(b"x" * 8192, server.size - 4096)
        assert ei.value.errno in (P.EINVAL, P.ENOSPC, P.EOVERFLOW)
        assert "outside the export" in str(ei.value)
        c.pwrite(b"y" * 4096, 0)                    # the connection survives a refused request
        assert c.pread(4096, 0) == b"y" * 4096


def test_queued_write_failure_raises_on_drain(serve):
    s = serve("nbdkit-memory")
    with connect(s) as c:
        c.write(s.size, b"z" * 4096)
        with pytest.raises(NbdOutOfRange):
            c.drain()


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbd-server"])
def test_wrong_export_name(serve, kind):
    s = serve(kind)
    with pytest.raises(NbdExportNotFound) as ei:
        NbdClient(s.host, s.port, "no-such-volume")
    assert ei.value.exit_code == 3 and "no-such-volume" in str(ei.value)


def test_connection_refused():
    port = nbdkit.free_port()
    with pytest.raises(NbdRefused) as ei:
        NbdClient("127.0.0.1", port, "x", timeout=5)
    assert isinstance(ei.value, LinkError) and ei.value.kind == "link"


def test_silent_server_times_out_in_handshake():
    """A peer that accepts but never speaks (a black-holed link) must raise, not hang."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    try:
        with pytest.raises(NbdTimeout) as ei:
            NbdClient("127.0.0.1", lsock.getsockname()[1], "x", timeout=0.5)
        assert ei.value.kind == "link"
    finally:
        lsock.close()


def test_stuck_server_times_out_mid_transfer(serve):
    s = serve("nbdkit-memory", filters=("delay",), params=("wdelay=30",))
    with connect(s, timeout=0.5) as c:
        c.write(0, b"a" * 4096)
        with pytest.raises(NbdTimeout):
            c.drain()


def test_server_killed_mid_transfer_raises_link_error(serve):
    s = serve("nbdkit-memory", size=256 * MiB, filters=("delay",), params=("wdelay=50ms",))

    def writer(started):
        with connect(s, timeout=10) as c:
            for i in range(10_000):
                c.write(i * 4096, b"k" * 4096)
                started.set()
            c.flush()

    error = kill_during(s, writer)
    assert isinstance(error, LinkError) and isinstance(error, (NbdConnectionLost, NbdTimeout)), error


def test_slow_flush_is_not_a_timeout(tmp_path):
    """A FLUSH may legitimately outlast the per-request timeout (write-back of a large cache); it gets
    flush_timeout instead, and a flush that outlasts even that still fails as a timeout."""
    srv = nbdkit.start("eval", "get_size=echo 1048576", "pwrite=cat >/dev/null", "can_write=exit 0",
                       "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                       "can_flush=exit 0", "flush=sleep 2")
    try:
        with NbdClient("127.0.0.1", srv.port, timeout=0.5, flush_timeout=60) as c:
            c.pwrite(b"f" * 4096, 0)
            c.flush()
        with NbdClient("127.0.0.1", srv.port, timeout=0.2, flush_timeout=0.2) as c:
            with pytest.raises(NbdTimeout):
                c.flush()
    finally:
        srv.stop()


def test_slow_server_completes_correctly(serve):
    s = serve("nbdkit-memory", filters=("delay",), params=("wdelay=10ms", "rdelay=10ms"))
    rnd = random.Random(3)
    data = {blk: rnd.randbytes(4096) for blk in rnd.sample(range(s.size // 4096), 200)}
    with connect(s) as c:
        for blk, payload in sorted(data.items()):
            c.write(blk * 4096, payload)
        c.flush()
        for blk, payload in data.items():
            assert c.pread(4096, blk * 4096) == payload


def test_erroring_server_raises_typed_error(serve):
    s = serve("nbdkit-memory", filters=("error",), params=("error=EIO", "error-pwrite-rate=100%"))
    with connect(s) as c:
        with pytest.raises(NbdError) as ei:
            c.pwrite(b"e" * 4096, 0)
        assert ei.value.errno == P.EIO and "EIO" in str(ei.value)
        assert not isinstance(ei.value, NbdOutOfRange)
        c.write(4096, b"e" * 4096)
        with pytest.raises(NbdError):
            c.flush()


def test_read_error_arrives_as_structured_error_chunk(serve):
    s = serve("nbdkit-memory", filters=("error",), params=("error=EPERM", "error-pread-rate=100%"))
    with connect(s) as c:
        assert c.geometry.structured
        with pytest.raises(NbdError) as ei:
            c.pread(4096, 0)
        assert ei.value.errno == P.EPERM and "read" in str(ei.value)
        c.pwrite(b"w" * 4096, 0)                    # writes still work on that connection


def test_block_size_constraints_are_reported(serve):
    s = serve("nbdkit-memory", filters=("blocksize-policy",),
              params=("blocksize-minimum=4096", "blocksize-preferred=65536", "blocksize-maximum=1M",
                      "blocksize-error-policy=error"))
    with connect(s) as c:
        g = c.geometry
        assert (g.min_block, g.preferred_block, g.max_payload) == (4096, 65536, 1 * MiB)
        with pytest.raises(NbdError) as ei:
            c.pwrite(b"u" * 512, 512)               # unaligned: the server enforces its minimum
        assert ei.value.errno == P.EINVAL and not isinstance(ei.value, NbdOutOfRange)


@pytest.fixture
def tls_export(tmp_path):
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(4 * MiB))
    with Export({"vol": str(vol)}, tls=True) as ex:
        yield ex.infos["vol"], vol


def test_tls_round_trip_with_pinned_certificate(tls_export):
    info, path = tls_export
    data = os.urandom(2 * MiB)
    with NbdClient(info.host, info.port, info.name, tls_cert_pem=info.tls_cert_pem) as c:
        assert c.geometry.tls and c.geometry.size == 4 * MiB
        for off in range(0, 2 * MiB, 256 << 10):
            c.write(off, data[off:off + (256 << 10)])
        c.flush()
        assert sha(c.pread(2 * MiB, 0)) == sha(data)
    assert sha(path.read_bytes()[:2 * MiB]) == sha(data)


def test_tls_wrong_pinned_certificate_is_refused(tls_export, tmp_path):
    info, _ = tls_export
    other = tmp_path / "other"
    other.mkdir()
    wrong = nbdkit.make_tls_dir(str(other))
    with pytest.raises(NbdTlsError):
        NbdClient(info.host, info.port, info.name, tls_cert_pem=wrong, timeout=5)


def test_tls_required_but_client_plain(tls_export):
    info, _ = tls_export
    with pytest.raises(NbdTlsError):
        NbdClient(info.host, info.port, info.name, timeout=5)


def test_a_full_secondary_is_a_space_fault_not_a_peer_error(serve):
    """A thin pool that fills mid-sync answers ENOSPC: the sync stops as a space fault (no auto_recover),
    with the reason, never as a link or peer fault."""
    from rcopy.engine.driver import fault_of
    from rcopy.errors import NoSpace
    s = serve("nbdkit-memory", filters=("error",), params=("error=ENOSPC", "error-pwrite-rate=100%"))
    with connect(s) as c:
        with pytest.raises(NoSpace) as ei:
            c.pwrite(b"s" * 4096, 0)
    assert isinstance(ei.value, NbdError) and ei.value.exit_code == 16 and fault_of(ei.value) == "space"
    assert "storage is full (ENOSPC)" in str(ei.value)
