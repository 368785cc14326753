"""The Sender port: an extent list from a source file lands exactly where the extents say, nowhere else."""
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rcopy.ports import ExportInfo
from rcopy.errors import LinkError
from rcopy.extent import Extent
from rcopy.sys import scratch
from rcopy.sys.nbdkit import NbdkitError
from rcopy.transport.client import NbdClient
from rcopy.transport.handshake import Geometry
from rcopy.transport.export import BadExportName, Export
from rcopy.transport.sender import (BadExtentList, ExportMismatch, ExtentBeyondExport, NbdSender, Piece,
                                    SourceReadError, plan)
from tests.unit.nbd_servers import MiB, kill_during, serve  # noqa: F401  (fixture)

BLK = 4096
PATTERN = b"\xa5\x5a\xc3\x3c"


def make_source(path, size, seed):
    """Random data with some all-zero 64 KiB runs (where the zero extents will point)."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    zero_runs = sorted(rnd.sample(range(size // (64 << 10)), 6))
    for r in zero_runs:
        data[r * (64 << 10):(r + 1) * (64 << 10)] = bytes(64 << 10)
    path.write_bytes(data)
    return bytes(data), zero_runs


def random_extents(size, zero_runs, seed, unaligned=False):
    """Sorted, non-overlapping data extents (4 KiB blocks, runs, and a large one) plus zero extents."""
    rnd = random.Random(seed)
    marks = {}
    for r in zero_runs:
        start = r * (64 << 10) + (512 if unaligned else 0)
        marks[start] = Extent(start, (64 << 10) - (1024 if unaligned else 0), zero=True)
    taken = set()
    for r in zero_runs:
        taken.update(range(r * 16, (r + 1) * 16))
    for blk in rnd.sample(range(size // BLK), 300):
        if blk in taken:
            continue
        n = rnd.choice([1, 1, 1, 2, 5])
        if any(b in taken for b in range(blk, blk + n)) or (blk + n) * BLK > size:
            continue
        taken.update(range(blk - 1, blk + n + 1))      # keep extents apart so the list stays sorted
        off, length = blk * BLK, n * BLK
        if unaligned:
            off, length = off + 100, length - 300
        marks[off] = Extent(off, length)
    return [marks[k] for k in sorted(marks)]


def check_exact(dest: bytes, source: bytes, extents, size):
    """Per block: bytes inside an extent equal the source, bytes outside still hold the pattern."""
    inside = bytearray(size)
    for e in extents:
        inside[e.offset:e.end] = b"\x01" * e.length
    pattern = (PATTERN * (size // len(PATTERN) + 1))[:size]
    for blk in range(0, size, BLK):
        mask = inside[blk:blk + BLK]
        if mask == b"\x01" * BLK:
            assert dest[blk:blk + BLK] == source[blk:blk + BLK], f"block {blk} differs from source"
        elif not any(mask):
            assert dest[blk:blk + BLK] == pattern[blk:blk + BLK], f"block {blk} written outside extents"
        else:
            for i in range(blk, blk + BLK):
                want = source[i] if inside[i] else pattern[i]
                assert dest[i] == want, f"byte {i} wrong"


@pytest.mark.parametrize("kind", ["nbdkit-file", "qemu-nbd", "nbd-server"])
def test_extents_land_exactly(serve, tmp_path, kind):
    size = 16 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=10)
    extents = random_extents(size, zero_runs, seed=11)
    s = serve(kind, size=size, fill=PATTERN)
    info = ExportInfo(s.host, s.port, s.name, size)
    seen = []
    sent = NbdSender(connections=3).send(str(tmp_path / "src"), extents, info, progress=seen.append)
    data_bytes = sum(e.length for e in extents if not e.zero)
    assert sent == data_bytes
    assert seen and seen[-1] == sum(e.length for e in extents)
    with open(s.path, "rb") as f:
        check_exact(f.read(), source, extents, size)


def test_unaligned_extents_honour_minimum_block_size(serve, tmp_path):
    """With a 4 KiB minimum block, unaligned extents are widened with source bytes, and an unaligned
    zero extent is zeroed only inside: its edges come from the source (which holds those bytes)."""
    size = 8 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=20)
    extents = random_extents(size, zero_runs, seed=21, unaligned=True)
    s = serve("nbdkit-file", size=size, fill=PATTERN, filters=("blocksize-policy",),
              params=("blocksize-minimum=4096", "blocksize-maximum=256K", "blocksize-error-policy=error"))
    NbdSender().send(str(tmp_path / "src"), extents, ExportInfo(s.host, s.port, "", size))
    widened = [Extent(e.offset // BLK * BLK, -(-e.end // BLK) * BLK - e.offset // BLK * BLK) for e in extents]
    with open(s.path, "rb") as f:
        check_exact(f.read(), source, widened, size)


def test_plan_splits_aligns_and_never_widens_zeroes():
    """The whole plan, spelled out: data widened to 4 KiB and split at 64 KiB; of the unaligned zero
    extent only the aligned middle is zeroes, its edges are data. A zero run planned as data, dropped,
    split or widened changes this list."""
    geo = Geometry(size=1 * MiB, flags=0, min_block=4096, max_payload=64 << 10)
    got = list(plan([Extent(100, 200_000), Extent(300_000, 20_000, zero=True)], geo))
    assert got == [Piece(0, 65_536, False), Piece(65_536, 65_536, False), Piece(131_072, 65_536, False),
                   Piece(196_608, 4096, False),
                   Piece(299_008, 4096, False), Piece(303_104, 16_384, True), Piece(319_488, 4096, False)]


def test_zero_extents_go_as_write_zeroes_and_land_as_zeroes(serve, tmp_path):
    """Every extent becomes exactly one request of its kind. The source holds no zero byte, so a zero
    extent sent as data would land as source bytes, and a dropped one would keep the fill pattern."""
    size = 4 * MiB
    src = tmp_path / "src"
    src.write_bytes(b"\x5a" * size)
    extents = [Extent(0, 64 << 10), Extent(128 << 10, 64 << 10, zero=True), Extent(1 * MiB, 8 << 10),
               Extent(2 * MiB, 1 * MiB, zero=True), Extent(3 * MiB + BLK, 512 << 10)]
    s = serve("nbdkit-file", size=size, fill=PATTERN)
    calls = []

    def recorded(kind, method, length):
        def call(offset, *args, **kw):
            calls.append((kind, offset, length(*args)))
            return method(offset, *args, **kw)
        return call

    class Recording(NbdSender):
        def _open(self, export, *where):
            c = super()._open(export, *where)
            c.zero = recorded("zero", c.zero, lambda n: n)
            c.write = recorded("data", c.write, len)
            c.write_from_file = recorded("data", c.write_from_file, lambda fd, n: n)
            return c

    sent = Recording(connections=1).send(str(src), extents, ExportInfo(s.host, s.port, s.name, size))
    assert sorted(calls) == sorted(("zero" if e.zero else "data", e.offset, e.length) for e in extents)
    assert sent == sum(e.length for e in extents if not e.zero)
    expect = bytearray(src.read_bytes())
    for e in extents:
        if e.zero:
            expect[e.offset:e.end] = bytes(e.length)
    with open(s.path, "rb") as f:
        check_exact(f.read(), bytes(expect), extents, size)


def test_export_serves_named_volumes_and_sender_writes_each(tmp_path):
    size = 4 * MiB
    srcs, vols = {}, {}
    for name in ("alpha", "beta"):
        srcs[name], zr = make_source(tmp_path / f"src-{name}", size, seed=len(name))
        vols[name] = tmp_path / f"dev-{name}"
        vols[name].write_bytes(bytes(size))
    with Export({n: str(p) for n, p in vols.items()}) as ex:
        assert set(ex.infos) == {"alpha", "beta"} and ex.infos["alpha"].size == size
        for name in vols:
            NbdSender().send(str(tmp_path / f"src-{name}"), [Extent(0, size)], ex.infos[name])
        pid = ex.server.pid
    assert all(vols[n].read_bytes() == srcs[n] for n in vols)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_readonly_export_is_refused_before_writing(tmp_path):
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(1 * MiB))
    (tmp_path / "src").write_bytes(b"s" * MiB)
    with Export({"vol": str(vol)}, readonly=True) as ex:
        with pytest.raises(ExportMismatch):
            NbdSender().send(str(tmp_path / "src"), [Extent(0, MiB)], ex.infos["vol"])
        with NbdClient(ex.infos["vol"].host, ex.infos["vol"].port, "vol") as c:
            assert c.geometry.readonly


def test_unsorted_extents_are_a_typed_error(serve, tmp_path):
    s = serve("nbdkit-memory", size=1 * MiB)
    (tmp_path / "src").write_bytes(bytes(MiB))
    with pytest.raises(BadExtentList):
        NbdSender().send(str(tmp_path / "src"), [Extent(8192, BLK), Extent(0, BLK)],
                         ExportInfo(s.host, s.port, "", MiB))


def test_bad_export_name_is_refused():
    with pytest.raises(BadExportName):
        Export({"../etc": "/dev/null"})


def test_source_read_error_is_typed(serve, tmp_path):
    s = serve("nbdkit-memory", size=1 * MiB)
    (tmp_path / "short").write_bytes(b"x" * 4096)
    with pytest.raises(SourceReadError) as ei:
        NbdSender().send(str(tmp_path / "short"), [Extent(0, 1 * MiB)], ExportInfo(s.host, s.port, "", MiB))
    assert ei.value.exit_code == 13


def test_export_killed_mid_send_raises_link_error(serve, tmp_path):
    size = 64 * MiB
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * (size // 256))
    s = serve("nbdkit-memory", size=size, filters=("delay",), params=("wdelay=20ms",))
    blocks = [Extent(b * 8 * BLK, BLK) for b in range(size // (8 * BLK))]

    def send(started):
        NbdSender(connections=2, timeout=10).send(str(src), blocks, ExportInfo(s.host, s.port, "", size),
                                                  progress=lambda n: started.set())

    assert isinstance(kill_during(s, send), LinkError)


@pytest.mark.parametrize("kind,expected", [("nbdkit-file", 3), ("qemu-nbd", 1)])
def test_multi_conn_only_where_the_server_offers_it(serve, tmp_path, kind, expected):
    size = 32 * MiB          # several slices of the plan: the extra connections open
    source, _ = make_source(tmp_path / "src", size, seed=30)
    s = serve(kind, size=size, fill=PATTERN)
    opened = []

    class Counting(NbdSender):
        def _open(self, export, *where):
            c = super()._open(export, *where)
            opened.append(c)
            return c

    Counting(connections=3).send(str(tmp_path / "src"), [Extent(0, size)], ExportInfo(s.host, s.port, s.name, size))
    assert len(opened) == expected
    assert opened[0].geometry.can_multi_conn == (expected > 1)
    assert sum(c.sent_payload for c in opened) == size
    with open(s.path, "rb") as f:
        assert f.read() == source


def test_export_dies_with_its_parent(tmp_path):
    """nbdkit runs with --exit-with-parent: an agent killed with SIGKILL leaves no writable export, and
    the next scratch directory made on the host sweeps the killed agent's (its TLS key with it)."""
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(MiB))
    code = ("import sys, time\nfrom rcopy.transport.export import Export\n"
            f"ex = Export({{'vol': {str(vol)!r}}})\nex.start()\n"
            "print(ex.server.pid, ex._dir, ex.server.workdir, flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid, *leftovers = child.stdout.readline().split()
        os.kill(int(pid), 0)                       # nbdkit is running
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        deadline = time.monotonic() + 30           # a hang detector, not a performance threshold
        while time.monotonic() < deadline:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
        made = scratch.make("export")       # (a test in another worker may have swept them already)
        os.rmdir(made)
        assert not any(os.path.exists(d) for d in leftovers)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        for d in leftovers:                        # what the killed agent could not remove
            shutil.rmtree(d, ignore_errors=True)


def test_sender_over_tls_lands_exactly(tmp_path):
    """Over TLS large extents take the preadv path instead of sendfile: same result."""
    size = 8 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=40)
    extents = [e for e in random_extents(size, zero_runs, seed=41) if e.end < size - 2 * MiB - BLK]
    extents.append(Extent(size - 2 * MiB, 2 * MiB))
    dev = tmp_path / "dev"
    dev.write_bytes((PATTERN * (size // len(PATTERN)))[:size])
    with Export({"vol": str(dev)}, tls=True) as ex:
        assert ex.infos["vol"].tls_cert_pem.startswith("-----BEGIN CERTIFICATE-----")
        sent = NbdSender().send(str(tmp_path / "src"), extents, ex.infos["vol"])
    assert sent == sum(e.length for e in extents if not e.zero)
    check_exact(dev.read_bytes(), source, extents, size)


def test_extent_beyond_the_export_is_refused_before_sending(serve, tmp_path):
    s = serve("nbdkit-memory", size=1 * MiB)
    (tmp_path / "src").write_bytes(bytes(2 * MiB))
    with pytest.raises(ExtentBeyondExport):
        NbdSender().send(str(tmp_path / "src"), [Extent(MiB, BLK)], ExportInfo(s.host, s.port, "", MiB))


def test_export_on_a_busy_port_is_a_typed_error(tmp_path):
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(MiB))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(NbdkitError) as ei:
            Export({"vol": str(vol)}, port=busy.getsockname()[1]).start()
    assert ei.value.exit_code == 12 and "in use" in str(ei.value)


@pytest.mark.parametrize("kind", ["nbdkit-file", "qemu-nbd", "nbd-server"])
def test_large_zero_extent_is_one_write_zeroes_and_nothing_more(serve, tmp_path, kind):
    size = 16 * MiB
    s = serve(kind, size=size, fill=b"\xff")
    (tmp_path / "src").write_bytes(bytes(size))
    sent = NbdSender().send(str(tmp_path / "src"), [Extent(MiB, 14 * MiB, zero=True)],
                            ExportInfo(s.host, s.port, s.name, size))
    assert sent == 0                                # no payload: zeroes travel as WRITE_ZEROES
    with open(s.path, "rb") as f:
        d = f.read()
    assert d[:MiB] == b"\xff" * MiB and d[MiB:15 * MiB] == bytes(14 * MiB) and d[15 * MiB:] == b"\xff" * MiB


def test_nothing_to_send_still_flushes_and_returns_zero(serve, tmp_path):
    s = serve("nbdkit-memory", size=1 * MiB)
    (tmp_path / "src").write_bytes(bytes(MiB))
    seen = []
    assert NbdSender().send(str(tmp_path / "src"), [], ExportInfo(s.host, s.port, "", MiB), seen.append) == 0
    assert seen[-1] == 0


def test_cancel_fails_a_send_stuck_in_its_flush_at_once(serve, tmp_path):
    """The demo found it: a link cut while a volume flushes made the sync wait the whole flush timeout
    (300 s) before failing. When the link is known to be down (the heartbeat failed, another volume's
    connection dropped), cancel() fails every send at once with a link error."""
    import threading
    from rcopy.transport.nbd_errors import NbdLinkError
    size = MiB
    (tmp_path / "src").write_bytes(os.urandom(size))
    # nbdkit's delay filter cannot slow FLUSH alone; a write that the server holds for 100 s blocks the
    # same wait (the reader owes a reply; silence below the timeout is legitimate)
    s = serve("nbdkit-memory", size=size, filters=("delay",), params=("wdelay=100",))
    sender = NbdSender(timeout=90)
    threading.Timer(2.0, sender.cancel, args=("the backup stopped answering its heartbeat",)).start()
    # without cancel() the held write would end in an NbdTimeout after 90 s, which "heartbeat" does not match
    with pytest.raises(NbdLinkError, match="heartbeat"):
        sender.send(str(tmp_path / "src"), [Extent(0, size)], ExportInfo(s.host, s.port, "", size))
    assert not sender._live


def test_the_export_admits_only_the_primary_of_this_session(tmp_path):
    """Issue 13: the export verifies its client. The holder of this session's client certificate
    writes; a client without a certificate, or with another one, is refused (AuthFailed, not a link
    fault) and writes nothing; the export names are not listed to anyone."""
    import dataclasses
    import subprocess
    from rcopy.errors import AuthFailed
    from rcopy.sys import nbdkit
    size = MiB
    (tmp_path / "src").write_bytes(os.urandom(size))
    dev = tmp_path / "dev"
    dev.write_bytes(bytes(size))
    mine = (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    pem = nbdkit.make_certificate(*mine, "rcopy-primary")
    other = (str(tmp_path / "c2.pem"), str(tmp_path / "k2.pem"))
    nbdkit.make_certificate(*other, "intruder")
    with Export({"vol": str(dev)}, tls=True, client_cert_pem=pem) as ex:
        info = ex.infos["vol"]
        for cert in (None, other):
            with pytest.raises(AuthFailed, match="did not admit this sync's client certificate"):
                NbdSender(timeout=5).send(str(tmp_path / "src"), [Extent(0, size)],
                                          dataclasses.replace(info, client_cert=cert))
        assert dev.read_bytes() == bytes(size)                      # nothing landed
        listing = subprocess.run(["nbdinfo", "--list", f"nbd://{info.host}:{info.port}"], capture_output=True,
                                 text=True, timeout=30)
        assert "vol" not in listing.stdout
        NbdSender().send(str(tmp_path / "src"), [Extent(0, size)], dataclasses.replace(info, client_cert=mine))
    assert dev.read_bytes() == (tmp_path / "src").read_bytes()


def test_a_plaintext_export_off_loopback_is_refused_before_connecting(tmp_path):
    from rcopy.transport.sender import PlaintextRefused
    (tmp_path / "src").write_bytes(bytes(BLK))
    with pytest.raises(PlaintextRefused, match="169.254.9.9"):
        NbdSender().send(str(tmp_path / "src"), [Extent(0, BLK)], ExportInfo("169.254.9.9", 10809, "vol", BLK))


def test_an_export_with_a_minimum_block_writes_whole_blocks_and_keeps_the_rest(tmp_path):
    """A thin pool without zeroing needs whole-block writes (rcopy.backends.write_granule): with
    minblock the export read-modify-writes around scattered 4 KiB extents and zero runs, so the bytes
    between them stay what the secondary held."""
    size, block = 4 * MiB, 64 * 1024
    rnd = random.Random(5)
    src, dev = tmp_path / "src", tmp_path / "dev"
    old = rnd.randbytes(size)
    dev.write_bytes(old)
    new = bytearray(old)
    extents = []
    for off in sorted(rnd.sample(range(0, size // 4096), 40)):
        zero = off % 3 == 0
        new[off * 4096:(off + 1) * 4096] = bytes(4096) if zero else rnd.randbytes(4096)
        extents.append(Extent(off * 4096, 4096, zero))
    src.write_bytes(bytes(new))
    with Export({"vol": str(dev)}, minblock=block) as ex:
        sent = NbdSender().send(str(src), extents, ex.infos["vol"])
        assert "--filter=blocksize" in " ".join(open(f"/proc/{ex.server.pid}/cmdline").read().split("\0"))
    assert dev.read_bytes() == bytes(new)
    assert sent <= sum(e.length for e in extents if not e.zero)   # the wire carries the change only


def test_a_coarse_write_align_rounds_writes_out_to_whole_blocks_read_from_the_source(tmp_path):
    """Blocks larger than the export can read-modify-write (thin pools of 128 KiB and up, without
    zeroing): the primary rounds every write out to whole blocks, read from its own snapshot."""
    size, block = 4 * MiB, 128 * 1024
    rnd = random.Random(9)
    src, dev = tmp_path / "src", tmp_path / "dev"
    src.write_bytes(rnd.randbytes(size))
    dev.write_bytes(rnd.randbytes(size))                 # stale bytes everywhere: the case that matters
    extents = [Extent(4096, 4096), Extent(12288, 4096, True), Extent(3 * block + 8192, 4096)]
    with Export({"vol": str(dev)}) as ex:
        info = dataclasses.replace(ex.infos["vol"], write_align=block)
        sent = NbdSender().send(str(src), extents, info)
    got, want = dev.read_bytes(), src.read_bytes()
    for b in (0, 3):                                     # the touched blocks now equal the source whole
        assert got[b * block:(b + 1) * block] == want[b * block:(b + 1) * block]
    assert got[block:3 * block] != want[block:3 * block]   # untouched blocks are not written
    assert sent == 2 * block


class Relay:
    """A second 'link' to a server: a TCP relay on another loopback address that cuts itself after
    ``cut_after`` bytes from the client, either resetting every connection ("reset") or going silent
    while keeping them open ("silent": a cable pulled, seen only by the client's timeout)."""

    def __init__(self, port, *, cut_after=None, mode="reset", host="127.0.0.2", pause=0.0):
        self.target, self.cut_after, self.mode, self.pause = port, cut_after, mode, pause
        self.relayed, self.cut = 0, False
        self.lock = threading.Lock()
        self.socks = []
        self.listener = socket.create_server((host, 0))
        self.host, self.port = host, self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [c, s]
            threading.Thread(target=self._pump, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, False), daemon=True).start()

    def _pump(self, src, dst, upstream):
        try:
            while True:
                if self.cut and self.mode == "silent":
                    time.sleep(60)
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream and self.pause:
                    time.sleep(self.pause)             # a slow link: about 64 KiB per pause
                if upstream and self.cut_after is not None:
                    with self.lock:
                        self.relayed += len(data)
                        if self.relayed >= self.cut_after and not self.cut:
                            self.cut = True
                            if self.mode == "reset":
                                self.close()
                                return
                if self.cut and self.mode == "silent":
                    continue
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.mark.parametrize("mode", ["reset", "silent"])
def test_a_lost_link_hands_its_requests_to_the_other(serve, tmp_path, mode):
    """Two links to one multi-conn export: the connections are spread over both; the second link dies
    mid-send (reset, or silent until the client's timeout), its unacknowledged requests go again over
    the first, every extent lands exactly, and the sender names the lost link."""
    size = 32 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=40)
    extents = [Extent(0, 12 * MiB), *[e for e in random_extents(size, zero_runs, seed=41) if e.offset >= 12 * MiB]]
    s = serve("nbdkit-file", size=size, fill=PATTERN)
    slow = Relay(s.port, host="127.0.0.5", pause=0.002)     # link 1: ~30 MB/s, so link 2 gets its share
    relay = Relay(s.port, cut_after=3 * MiB, mode=mode)
    try:
        sender = NbdSender(connections=2, timeout=5.0)      # the silent link is found lost after this
        info = ExportInfo(slow.host, slow.port, s.name, size, more=((relay.host, relay.port),))
        sent = sender.send(str(tmp_path / "src"), extents, info)
    finally:
        relay.close()
        slow.close()
    assert relay.cut, "the second link carried less than 3 MiB: the connections were not spread"
    assert list(sender.lost_links) == [relay.host]
    assert sent >= sum(e.length for e in extents if not e.zero)
    with open(s.path, "rb") as f:
        check_exact(f.read(), source, extents, size)


def test_a_link_down_from_the_start_is_skipped_and_every_link_down_fails(serve, tmp_path):
    size = 8 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=50)
    extents = random_extents(size, zero_runs, seed=51)
    s = serve("nbdkit-file", size=size, fill=PATTERN)
    dead = socket.create_server(("127.0.0.3", 0))      # bound, never listening to anyone: refused
    dead_port = dead.getsockname()[1]
    dead.close()
    sender = NbdSender(connections=2, timeout=2.0)
    sender.send(str(tmp_path / "src"), extents, ExportInfo(s.host, s.port, s.name, size,
                                                           more=(("127.0.0.3", dead_port),)))
    assert list(sender.lost_links) == ["127.0.0.3"]
    with open(s.path, "rb") as f:
        check_exact(f.read(), source, extents, size)
    # a link that accepts but never answers (a listener nobody serves): the send does not wait for it;
    # its connection is left behind, still opening, when the plan is done
    silent = socket.create_server(("127.0.0.6", 0))
    try:
        sender = NbdSender(connections=2, timeout=120.0)
        sender.send(str(tmp_path / "src"), extents, ExportInfo(s.host, s.port, s.name, size,
                                                               more=(silent.getsockname(),)))
        assert sender.lost_links == {} and sender.used_links == {s.host}
    finally:
        silent.close()
    # the first link dead as well: nothing to send over, a link error (what auto_recover retries)
    with pytest.raises(LinkError):
        NbdSender(timeout=2.0).send(str(tmp_path / "src"), extents,
                                    ExportInfo("127.0.0.3", dead_port, s.name, size, more=(("127.0.0.4", dead_port),)))


def test_a_link_lost_at_the_flush_is_survived_when_another_connection_flushes():
    """Every request was acknowledged before the FLUSH; on a multi-conn export one connection's FLUSH
    makes them all durable, so a link lost at that moment (another volume's connection there timed out
    and aborted this one) fails nothing while a connection flushes; with none left, the send fails."""
    from rcopy.transport.nbd_errors import NbdConnectionLost

    class Conn:
        def __init__(self, host, ok):
            self.host, self.ok, self.flushed = host, ok, False

        def flush(self):
            if not self.ok:
                raise NbdConnectionLost("link lost", where=f"{self.host}:1")
            self.flushed = True

    good, bad = Conn("169.254.9.1", True), Conn("169.254.9.2", False)
    sender = NbdSender()
    assert sender._flush([bad, good], failover=True) == [good] and good.flushed
    assert list(sender.lost_links) == ["169.254.9.2"]
    with pytest.raises(LinkError):
        NbdSender()._flush([Conn("169.254.9.2", False)], failover=True)
    with pytest.raises(LinkError):                  # without multi-conn a flush covers only its own writes
        NbdSender()._flush([bad, good], failover=False)


def test_a_data_connection_gets_the_targets_link_timeout_never_less_than_nbds():
    """An admin who lengthens a target's link timeout for a WAN that blips lengthens the data
    connections' patience too; a short one (a heartbeat for ssh) does not make them give up sooner."""
    from rcopy.app import session
    from rcopy.transport.client import DEFAULT_TIMEOUT
    assert session.driver(None, None, link_timeout=120).sender.timeout == 120
    assert session.driver(None, None, link_timeout=5).sender.timeout == DEFAULT_TIMEOUT


class Opening(NbdSender):
    """Records every connection it opens and the thread that opened it; ``gate``, when set, holds each
    opening until released (a slow link)."""

    def __init__(self, *a, gate=None, **k):
        super().__init__(*a, **k)
        self.opened, self.gate = [], gate

    def _open(self, export, *where):
        if self.gate is not None:
            self.gate.wait()
        c = super()._open(export, *where)
        self.opened.append((c, threading.current_thread().name))
        return c


def _closed(c):
    c._reader.join(10)
    return not c._reader.is_alive()


def test_prepared_connections_are_the_ones_the_sends_use_and_release_closes_the_rest(tmp_path):
    size = 2 * MiB
    srcs, vols = {}, {}
    for name in ("alpha", "beta", "gamma"):
        srcs[name], _ = make_source(tmp_path / f"src-{name}", size, seed=len(name) + 70)
        vols[name] = tmp_path / f"dev-{name}"
        vols[name].write_bytes(bytes(size))
    with Export({n: str(p) for n, p in vols.items()}) as ex:
        sender = Opening(connections=1)
        sender.prepare(ex.infos.values())
        for name in ("alpha", "beta"):           # gamma sends nothing: its connection is left over
            sender.send(str(tmp_path / f"src-{name}"), [Extent(0, size)], ex.infos[name])
        assert [t for _, t in sender.opened] == ["nbd-prepare"] * 3      # no send opened one of its own
        assert sorted(c.export for c, _ in sender.opened) == ["alpha", "beta", "gamma"]
        gamma = next(c for c, _ in sender.opened if c.export == "gamma")
        assert not gamma._closing
        sender.release()
        assert _closed(gamma) and not sender._live
        # after a release the sender opens as it did before any prepare
        sender.send(str(tmp_path / "src-gamma"), [Extent(0, size)], ex.infos["gamma"])
        assert len(sender.opened) == 4 and sender.opened[-1][1] != "nbd-prepare"
    assert all(vols[n].read_bytes() == srcs[n] for n in vols)


def test_a_prepared_connection_that_failed_fails_its_send_without_a_second_try(tmp_path):
    dead = socket.create_server(("127.0.0.3", 0))      # bound, then closed: nobody listens, refused
    port = dead.getsockname()[1]
    dead.close()
    (tmp_path / "src").write_bytes(bytes(MiB))
    info = ExportInfo("127.0.0.3", port, "vol", MiB)
    sender = Opening(timeout=2.0)
    attempts = []
    sender._open_first = lambda export, _real=sender._open_first: attempts.append(export) or _real(export)
    sender.prepare([info])
    with pytest.raises(LinkError):
        sender.send(str(tmp_path / "src"), [Extent(0, MiB)], info)
    assert attempts == [info]


def test_a_connection_released_while_it_opens_is_closed_once_open(tmp_path):
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(MiB))
    with Export({"vol": str(vol)}) as ex:
        gate = threading.Event()
        sender = Opening(gate=gate)
        sender.prepare(ex.infos.values())
        sender.release()                          # returns at once: the opening is held at the gate
        gate.set()
        for _ in range(200):
            if sender.opened and not sender._live:
                break
            time.sleep(0.05)
        (c, _), = sender.opened
        assert _closed(c) and not sender._live and not sender._ready


def test_a_delta_of_one_slice_opens_no_second_connection_on_the_same_link(serve, tmp_path):
    size = 8 * MiB
    source, zero_runs = make_source(tmp_path / "src", size, seed=80)
    extents = random_extents(size, zero_runs, seed=81)            # ~300 small extents: one slice
    s = serve("nbdkit-file", size=size, fill=PATTERN)
    sender = Opening(connections=3)
    sender.send(str(tmp_path / "src"), extents, ExportInfo(s.host, s.port, s.name, size))
    (c, _), = sender.opened
    assert c.geometry.can_multi_conn                              # offered, and not worth a handshake
    with open(s.path, "rb") as f:
        check_exact(f.read(), source, extents, size)


def test_the_dealer_reports_a_long_plan_once_at_its_second_slice():
    from rcopy.transport.sender import _Dealer
    calls = []
    d = _Dealer(iter([Piece(i * MiB, MiB, False) for i in range(16)]), on_more=lambda: calls.append(1))
    assert len(d.take()) == 8 and calls == []
    assert len(d.take()) == 8 and calls == [1]
    assert d.take() == [] and d.take() == [] and calls == [1]      # every connection's last look: no more
    short = _Dealer(iter([Piece(0, MiB, False)]), on_more=lambda: calls.append(2))
    assert len(short.take()) == 1 and short.take() == [] and short.take() == [] and calls == [1]
