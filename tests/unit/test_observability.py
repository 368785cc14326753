"""Progress of a running sync counts only what the backup acknowledged, never what was read (issue 14:
a demo showed 99% with 4.4 MiB of 15.6 MiB landed): the driver reports the sender's acknowledged bytes,
and the real NBD sender reports nothing a slow server has not written yet."""
import os

from rcopy.engine.states import Event
from rcopy.extent import Extent
from rcopy.ports import ExportInfo
from rcopy.transport.sender import NbdSender

from tests.unit.engine_fakes import FakeSender
from tests.unit.nbd_servers import serve  # noqa: F401  (fixture)
from tests.unit.test_cli_replication import MiB, needs_nbdkit_mark

# -- progress: what the backup acknowledged, never what was read --------------------------------------

class _Recorder:
    def __init__(self):
        self.updates = []

    def start(self, volume, total):
        pass

    def update(self, volume, done, total):
        self.updates.append((volume, done, total))

    def finish(self, volume, sent, reason):
        pass


class ReadAheadSender(FakeSender):
    """Reads every extent first (as the real sender's reader runs ahead of the wire), then lands and
    acknowledges them one by one, reporting acknowledged bytes as the real NbdSender does."""

    def send(self, source_path, extents, export, progress=None):
        data, dest = self.primary.data(source_path), self.backup[export.name]
        read = list(extents)                          # the whole volume read before any reply
        self.acked[export.name] = 0
        for e in read:
            dest[e.offset:e.end] = bytes(e.length) if e.zero else data[e.offset:e.end]
            self.acked[export.name] += e.length
            progress(self.acked[export.name])
        return sum(e.length for e in read if not e.zero)


def test_driver_reports_acknowledged_bytes_not_the_read_position(tmp_path):
    from tests.unit.test_engine_cycle import SIZE, Rig
    rig = Rig(tmp_path)
    rig.sender = ReadAheadSender(rig.psnap, rig.bdisks, rig.log)
    rig.sender.acked = {}
    rec = _Recorder()
    rig.connect()
    rig.driver.sender, rig.driver.progress = rig.sender, rec
    rig.sync(Event.START)                             # full: every block of both volumes
    assert rec.updates
    acked_seen = {}
    for volume, done, total in rec.updates:
        assert done <= total <= SIZE
        assert done >= acked_seen.get(volume, 0)      # never goes back
        acked_seen[volume] = done
    # the read position was the volume's end from the first update on; progress started low
    firsts = {}
    for volume, done, _ in rec.updates:
        firsts.setdefault(volume, done)
    assert all(done < SIZE for done in firsts.values())
    assert {v: d for v, d in acked_seen.items()} == {"a": SIZE, "b": SIZE}


@needs_nbdkit_mark
def test_sender_progress_never_exceeds_what_landed_on_a_slow_server(serve, tmp_path):  # noqa: F811
    """nbdkit's file plugin under the delay filter (and noparallel: one request at a time) writes each
    request into the file before it replies: at every progress report, the reported bytes must already
    be in the server's file."""
    size, chunk = 4 * MiB, 256 * 1024
    s = serve("nbdkit-file", size=size, filters=("noparallel", "delay"), params=("delay-write=100ms",))
    src = tmp_path / "src"
    data = os.urandom(size)
    src.write_bytes(data)
    reports = []

    def landed() -> int:
        with open(s.path, "rb") as f:
            have = f.read()
        return sum(4096 for o in range(0, size, 4096) if have[o:o + 4096] == data[o:o + 4096])

    def progress(done):
        reports.append((done, landed()))

    extents = [Extent(o, chunk) for o in range(0, size, chunk)]
    sent = NbdSender(max_request=chunk).send(str(src), extents, ExportInfo(s.host, s.port, "", size), progress)
    assert sent == size and landed() == size
    assert all(done <= on_disk for done, on_disk in reports), reports
    assert any(0 < done < size for done, _ in reports), reports       # reports came while it was sending
    assert reports[-1][0] == size
