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
    with connect(s, timeout=2) as c:      # room for the handshake on a loaded machine; the write takes 30 s
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
                       "can_flush=exit 0", "flush=sleep 4")
    try:       # timeouts leave the eval plugin's shell-per-callback handshake room on a loaded machine
        with NbdClient("127.0.0.1", srv.port, timeout=2, flush_timeout=60) as c:
            c.pwrite(b"f" * 4096, 0)
            c.flush()
        with NbdClient("127.0.0.1", srv.port, timeout=2, flush_timeout=2) as c:
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


def _future_certificate(d) -> tuple[str, str, str]:
    """A self-signed certificate valid only from 2030: what the backup sees when its clock is behind the
    primary's (openssl req cannot set the start date, openssl ca can)."""
    import subprocess
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    (d / "ca.cnf").write_text("[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\n"
                              "default_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n")
    run = dict(cwd=d, check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "k.pem", "-out", "r.csr", "-subj", "/CN=rcopy-primary"], **run)
    subprocess.run(["openssl", "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "k.pem", "-in", "r.csr",
                    "-out", "full.pem", "-startdate", "300101000000Z", "-enddate", "300201000000Z"], **run)
    text = (d / "full.pem").read_text()
    pem = text[text.index("-----BEGIN CERTIFICATE"):]
    (d / "c.pem").write_text(pem)
    return str(d / "c.pem"), str(d / "k.pem"), pem


@pytest.mark.parametrize("case", ["another certificate", "no certificate", "not yet valid (clock skew)"])
def test_a_client_the_export_does_not_admit_is_refused_not_a_dead_link(tmp_path, case):
    """Issue 13: nbdkit --tls-verify-peer drops a client whose certificate it does not admit right after
    the TLS handshake, with no alert. That is an AuthFailed (exit 20, fault "auth": auto_recover does not
    restart it), with one line naming what to check, never "lost the connection" (a link fault that
    auto_recover would retry for ever). The holder of the admitted certificate still gets in."""
    from rcopy.engine.driver import fault_of
    from rcopy.errors import AuthFailed
    from rcopy.transport.nbd_errors import NbdClientRefused
    admitted = nbdkit.make_certificate(str(tmp_path / "ok.pem"), str(tmp_path / "ok.key"), "rcopy-primary")
    (tmp_path / "dev").write_bytes(bytes(MiB))
    if case == "another certificate":
        nbdkit.make_certificate(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), "rcopy-primary")
        presented = (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    elif case == "no certificate":
        presented = None
    else:
        (tmp_path / "future").mkdir()
        cert, key, admitted = _future_certificate(tmp_path / "future")     # the export trusts exactly it...
        presented = (cert, key)                                            # ...but not before 2030
    with Export({"vol": str(tmp_path / "dev")}, tls=True, client_cert_pem=admitted) as ex:
        info = ex.infos["vol"]
        with pytest.raises(NbdClientRefused) as ei:
            NbdClient(info.host, info.port, info.name, tls_cert_pem=info.tls_cert_pem, client_cert=presented,
                      timeout=10)
        if case != "not yet valid (clock skew)":
            with NbdClient(info.host, info.port, info.name, tls_cert_pem=info.tls_cert_pem, timeout=10,
                           client_cert=(str(tmp_path / "ok.pem"), str(tmp_path / "ok.key"))) as c:
                assert c.geometry.tls and c.geometry.size == MiB
    e = ei.value
    assert isinstance(e, AuthFailed) and not isinstance(e, LinkError) and e.kind != "link"
    assert e.exit_code == 20 and fault_of(e) == "auth"
    msg = str(e)
    assert "\n" not in msg and info.host in msg and "client certificate" in msg and "clocks" in msg


def test_a_server_that_drops_us_after_tls_and_then_dies_is_a_link_error(tmp_path):
    """The refusal is confirmed by a second attempt: a server that drops us right after TLS once and is
    then gone (nbdkit killed, the backup crashed) stays a link fault that auto_recover retries."""
    import ssl
    import threading
    cert, key = str(tmp_path / "s.pem"), str(tmp_path / "s.key")
    pem = nbdkit.make_certificate(cert, key, "rcopy")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    served = []

    def once():
        conn, _ = lsock.accept()
        lsock.close()                                   # the second attempt finds nobody listening
        conn.sendall(P.SERVER_GREETING.pack(magic=P.NBDMAGIC, ihaveopt=P.IHAVEOPT, flags=P.FLAG_FIXED_NEWSTYLE))
        conn.recv(P.CLIENT_FLAGS.size, socket.MSG_WAITALL)
        opt = P.OPTION.unpack(conn.recv(P.OPTION.size, socket.MSG_WAITALL))
        conn.sendall(P.OPTION_REPLY.pack(magic=P.REPLY_MAGIC, option=opt.option, type=P.REP_ACK, length=0))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        tls = ctx.wrap_socket(conn, server_side=True)
        served.append(opt.option)
        tls.close()

    t = threading.Thread(target=once, daemon=True)
    t.start()
    with pytest.raises(NbdRefused):
        NbdClient("127.0.0.1", port, "vol", tls_cert_pem=pem, timeout=10)
    t.join(10)
    assert served == [P.OPT_STARTTLS]


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


def test_session_certificates_tolerate_a_peer_clock_behind_ours(tmp_path):
    """A certificate made now must already be valid for a peer whose clock is behind: TLS checks the
    dates even of a pinned certificate (it was 'openssl req', valid from the second it was made)."""
    import datetime
    from cryptography import x509
    from rcopy.sys import nbdkit
    pem = nbdkit.make_certificate(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), "rcopy-primary")
    cert = x509.load_pem_x509_certificate(pem.encode())
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now - datetime.timedelta(minutes=59)
    assert cert.not_valid_after_utc >= now + datetime.timedelta(days=6)
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
