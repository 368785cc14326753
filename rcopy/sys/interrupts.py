"""Hold SIGTERM and SIGINT back across a step that must not stop half-way.

rcopy takes SIGTERM as Ctrl-C (rcopy.app.signals): the exception unwinds through every ``finally``.
Raised in the middle of an LVM command, it used to kill the command (the lvm shell, or the process
``subprocess`` runs), and LVM stopped between the two metadata commits of ``lvcreate -s`` leaves the
new snapshot's COW store behind as a plain LV under the snapshot's name (found by the fault campaign:
the next sync refused it as "not a snapshot"). Inside ``deferred()`` a signal is only noted; it is
sent again, to the handlers in place before, when the step is done, so the process stops right after
it, as it would have.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def deferred():
    """Run the block without being interrupted by SIGTERM or SIGINT; one that came meanwhile is
    delivered on the way out. Handlers live in the main thread, so elsewhere this changes nothing (a
    signal interrupts the main thread there, not this one)."""
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, SIGNALS):
        yield                               # (None: a handler set outside Python, which could not be put back)
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):
            os.kill(os.getpid(), s)
