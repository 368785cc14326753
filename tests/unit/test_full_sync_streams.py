"""Issue 10: a full sync streams. The extents of a 256 MiB volume flow from the scan to the sender
while the scan is still reading (a driver that materialised them first would hand the sender a scan
that had already ended), and the process's peak memory stays far below the volume's size."""
import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os, resource, sys
from rcopy import backends
from rcopy.engine import plan as P
from rcopy.engine.driver import Driver, _Run
from rcopy.ports import ExportInfo

path, size = sys.argv[1], int(sys.argv[2])
real = backends.get("file")
state = {"scan_done": False, "first_seen_scan_done": None, "extents": 0, "bytes": 0}

class WatchedBackend:
    name, snapshotter, changes = real.name, real.snapshotter, real.changes
    def full(self, snap):
        yield from real.full(snap)
        state["scan_done"] = True

class CountingSender:
    def send(self, source_path, extents, export, progress=None):
        for e in extents:
            if state["first_seen_scan_done"] is None:
                state["first_seen_scan_done"] = state["scan_done"]
            state["extents"] += 1
            state["bytes"] += e.length
            if progress:
                progress(0)
        return state["bytes"]

class Store:
    def progress(self, *a): pass

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = Driver(Store(), None, backend=lambda k: WatchedBackend(), cut=None, delete=None, sender=CountingSender())
run = _Run()
snap = real.snapshotter.cut([(path, "rcopy.g.vol.P1")])[0]
run.snaps[snap.name] = snap
run.exports["/sec"] = ExportInfo("127.0.0.1", 1, "vol", size)
d._send_one(P.Send("vol", path, "/sec", "file", size, snap.name, None, "initial sync"), run)
state["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state["rss_before_kib"] = before
print(json.dumps(state))
"""


def test_full_sync_of_256_mib_starts_sending_before_the_scan_ends(tmp_path):
    size = 256 << 20
    path = tmp_path / "vol.img"
    block = os.urandom(4096)
    with open(path, "wb") as f:                       # data and zero blocks alternate: 65,536 extents
        for _ in range(size // 8192):
            f.write(block)
            f.write(bytes(4096))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(size)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["first_seen_scan_done"] is False, "the sender got its first extent only after the scan ended"
    assert state["scan_done"] and state["bytes"] == size and state["extents"] == size // 4096
    # bounded: the scan's buffers and the sender's window, never the volume or the extent list
    assert state["peak_rss_kib"] < 160 << 10, state
    print(f"full sync of 256 MiB: {state['extents']} extents, peak RSS {state['peak_rss_kib'] // 1024} MiB "
          f"(interpreter and imports {state['rss_before_kib'] // 1024} MiB)")
