"""Throw-away NBD servers on 127.0.0.1 for the transport tests (libnbd's habit: test against real
servers, never kernel NBD). Each helper starts a server on a free port, waits until it accepts
connections, and its fixture kills exactly that process at teardown.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time

import pytest

from rcopy.sys import nbdkit

MiB = 1 << 20


@dataclasses.dataclass
class Served:
    """A running test server: where to connect, which export, and the backing file if any."""

    kind: str
    host: str
    port: int
    name: str
    size: int
    path: str | None
    stop: callable
    kill: callable


def _wait_listening(port: int, proc_alive, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive():
            raise RuntimeError(f"server on port {port} exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} not listening after {timeout} s")


def _make_file(path: str, size: int, fill: bytes = b"") -> str:
    with open(path, "wb") as f:
        if fill:
            f.write((fill * (size // len(fill) + 1))[:size])
        else:
            f.truncate(size)
    return path


def start_nbdkit(tmp_path, *, plugin="memory", size=16 * MiB, filters=(), params=(), tls_dir=None,
                 fill: bytes = b"") -> Served:
    if plugin == "memory":
        srv = nbdkit.start("memory", f"size={size}", *params, filters=filters, tls_dir=tls_dir)
        path = None
    else:
        path = _make_file(str(tmp_path / "nbdkit.img"), size, fill)
        srv = nbdkit.start("file", path, *params, filters=filters, tls_dir=tls_dir)
    return Served("nbdkit", "127.0.0.1", srv.port, "", size, path, srv.stop, srv.kill)


def start_qemu_nbd(tmp_path, *, size=16 * MiB, fill: bytes = b"") -> Served:
    path = _make_file(str(tmp_path / "qemu.img"), size, fill)
    port = nbdkit.free_port()
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--bind", "127.0.0.1", "-p", str(port), "-x", "vol",
                             "-t", "--cache=writeback", path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_listening(port, lambda: proc.poll() is None)
    return Served("qemu-nbd", "127.0.0.1", port, "vol", size, path, *_stoppers(proc))


def start_nbd_server(tmp_path, *, size=16 * MiB, fill: bytes = b"") -> Served:
    """nbd-server daemonizes; we stop it by the pid it writes (never by name)."""
    path = _make_file(str(tmp_path / "nbd-server.img"), size, fill)
    port = nbdkit.free_port()
    conf, pidfile = tmp_path / "nbd-server.conf", tmp_path / "nbd-server.pid"
    conf.write_text(f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n"
                    f"[vol]\n    exportname = {path}\n    flush = true\n    trim = true\n")
    subprocess.run(["nbd-server", "-C", str(conf), "-p", str(pidfile)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL, capture_output=True)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int(pidfile.read_text().strip())

    def alive():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(sig=signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    _wait_listening(port, alive)
    return Served("nbd-server", "127.0.0.1", port, "vol", size, path, stop, lambda: stop(signal.SIGKILL))


def _stoppers(proc: subprocess.Popen):
    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def kill():
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    return stop, kill


STARTERS = {"nbdkit-memory": lambda t, **kw: start_nbdkit(t, **kw),
            "nbdkit-file": lambda t, **kw: start_nbdkit(t, plugin="file", **kw),
            "qemu-nbd": start_qemu_nbd,
            "nbd-server": start_nbd_server}


@pytest.fixture
def serve(tmp_path):
    """serve(kind, **options) -> Served; every server started is stopped at teardown."""
    started: list[Served] = []

    def _serve(kind: str, **kw) -> Served:
        s = STARTERS[kind](tmp_path, **kw)
        started.append(s)
        return s

    yield _serve
    for s in started:
        s.stop()


@pytest.fixture(params=sorted(STARTERS))
def server(request, serve) -> Served:
    """Each kind of server in turn, 16 MiB, empty."""
    return serve(request.param)


def kill_during(served: Served, work) -> BaseException | None:
    """Run work(started) in a thread; once it calls started.set(), SIGKILL the server and return what
    work raised (None if it finished). Fails if work never starts or hangs after the kill: the join
    timeouts are hang detectors, not performance thresholds."""
    import threading
    started, outcome = threading.Event(), {}

    def body():
        try:
            work(started)
        except BaseException as e:      # handed back to the test
            outcome["error"] = e
        finally:
            started.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    assert started.wait(60), "work never started"
    served.kill()
    t.join(60)
    assert not t.is_alive(), "client hung after the server died"
    return outcome.get("error")
