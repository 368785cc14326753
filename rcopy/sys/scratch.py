"""Private scratch directories that no killed process leaves behind for long.

A sync's throw-away keys (the primary's client key, the export's TLS key) and nbdkit's pid and log
files live in a directory of their own under the system's temporary directory, removed when their
work ends. A process killed outright (SIGKILL, the OOM killer) removes nothing, so each directory is
named after its owner's pid, and every new one first sweeps those whose owner is gone: a key outlives
its process only until the next rcopy on that host makes a directory.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

_OWNED = re.compile(r"^rcopy-[a-z]+-(\d+)-")


def make(kind: str) -> str:
    """A new 0700 directory ``rcopy-KIND-PID-*``, after sweeping what dead owners left."""
    sweep()
    return tempfile.mkdtemp(prefix=f"rcopy-{kind}-{os.getpid()}-")


@contextlib.contextmanager
def directory(kind: str):
    """``make``, removed on leaving."""
    path = make(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep(base: str | None = None) -> list[str]:
    """Remove the scratch directories whose owner process is gone; return their paths."""
    base = base or tempfile.gettempdir()
    gone = []
    try:
        names = os.listdir(base)
    except OSError:
        return gone
    for name in names:
        m = _OWNED.match(name)
        if m and not _alive(int(m.group(1))):
            path = os.path.join(base, name)
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True
