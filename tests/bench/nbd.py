"""scripts/bench nbd [--size N] [--repeat R] [--servers nbdkit,qemu-nbd]: rcopy's NBD Sender vs nbdcopy.

Every row copies from a source file on tmpfs (/dev/shm, random data, so no zero detection helps) into a
fresh sparse raw file on tmpfs, exported on 127.0.0.1 by nbdkit's file plugin exactly as the backup does it
(rcopy.transport.export.Export) or by qemu-nbd.
Rows: nbdcopy-full (libnbd's nbdcopy, --flush, the reference), rcopy-full, rcopy-delta-1pct and
rcopy-delta-10pct (random 4 KiB blocks, each its own extent before coalescing, flush included). One JSON
object per row: name, server, bytes, seconds, mbps, requests_per_s (4 KiB blocks per second for deltas,
NBD requests per second for full copies), and ratio_to_nbdcopy for rcopy-full.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))   # the checkout

from rcopy.ports import ExportInfo  # noqa: E402
from rcopy.extent import Extent  # noqa: E402
from rcopy.sys import nbdkit  # noqa: E402
from rcopy.sys.run import run  # noqa: E402
from rcopy.transport.export import Export  # noqa: E402
from rcopy.transport.sender import NbdSender  # noqa: E402

BLK = 4096


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)


def make_source(path: str, size: int) -> None:
    chunk = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


class Server:
    """A fresh export per row, so no row benefits from what an earlier one wrote."""

    def __init__(self, kind: str, size: int, workdir: str):
        self.kind, self.size, self.workdir = kind, size, workdir
        self.proc = None

    def __enter__(self) -> ExportInfo:
        img = os.path.join(self.workdir, "target.img")
        with open(img, "wb") as f:
            f.truncate(self.size)
        if self.kind == "nbdkit":
            self.export = Export({"vol": img}, host="127.0.0.1")     # the backup's real export path
            return self.export.start()["vol"]
        port = nbdkit.free_port()
        # A bench is not rcopy: it may start qemu-nbd itself (rcopy never runs qemu-nbd).
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--bind", "127.0.0.1", "-p", str(port),
                                      "-x", "vol", "-t", "--cache=writeback", "--aio=threads", img],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)   # it complains about the port probe
        _wait_port(port)
        return ExportInfo("127.0.0.1", port, "vol", self.size)

    def __exit__(self, *exc) -> None:
        if self.kind == "nbdkit":
            self.export.stop()
        else:
            self.proc.terminate()
            self.proc.wait(10)
        os.unlink(os.path.join(self.workdir, "target.img"))


def _wait_port(port: int) -> None:
    import socket
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"qemu-nbd did not listen on {port}")


def uri(info: ExportInfo) -> str:
    return f"nbd://{info.host}:{info.port}/{info.name}"


def row(name: str, server: str, nbytes: int, seconds: float, requests: int, **extra) -> dict:
    r = {"name": name, "server": server, "bytes": nbytes, "seconds": round(seconds, 4),
         "mbps": round(nbytes / seconds / 1e6, 1), "requests_per_s": round(requests / seconds)}
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


def delta_extents(size: int, fraction: float, seed: int) -> list[Extent]:
    nblocks = size // BLK
    picked = sorted(random.Random(seed).sample(range(nblocks), int(nblocks * fraction)))
    return [Extent(b * BLK, BLK) for b in picked]


def bench_server(kind: str, size: int, src: str, workdir: str, sender: NbdSender) -> None:
    with Server(kind, size, workdir) as info:
        t0 = time.perf_counter()
        run(["nbdcopy", "--flush", src, uri(info)], check=True, timeout=3600)
        ref = time.perf_counter() - t0
    row("nbdcopy-full", kind, size, ref, size // (256 << 10))
    with Server(kind, size, workdir) as info:
        t0 = time.perf_counter()
        sent = sender.send(src, [Extent(0, size)], info)
        secs = time.perf_counter() - t0
    row("rcopy-full", kind, sent, secs, -(-size // sender.max_request), ratio_to_nbdcopy=round(ref / secs, 3))
    for pct in (1, 10):
        exts = delta_extents(size, pct / 100, seed=pct)
        with Server(kind, size, workdir) as info:
            t0 = time.perf_counter()
            sent = sender.send(src, exts, info)
            secs = time.perf_counter() - t0
        row(f"rcopy-delta-{pct}pct", kind, sent, secs, len(exts), blocks=len(exts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench nbd", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes to copy (suffix K/M/G), default 1G")
    ap.add_argument("--servers", default="nbdkit,qemu-nbd")
    ap.add_argument("--connections", type=int, default=NbdSender.connections)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    size = parse_size(args.size) // BLK * BLK
    workdir = tempfile.mkdtemp(prefix="rcopy-bench-nbd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src = os.path.join(workdir, "source")
        make_source(src, size)
        sender = NbdSender(connections=args.connections)
        for _ in range(args.repeat):
            for kind in args.servers.split(","):
                bench_server(kind, size, src, workdir, sender)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
