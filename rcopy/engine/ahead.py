"""Change detection running ahead of the wire: a volume's extents are found on one thread while
another sends those already found.

Without it the thread that sends also pulls the change source, so the two alternate: a batch of
candidate blocks is read and hashed (here, and on the backup for its digests) while the connection
waits, then the batch's changed blocks are sent while the disks wait. With the source on its own
thread, the refine of the next batch overlaps the send of this one.

``Ahead`` keeps the source's order and its errors: every extent found before a failure is handed over
first, then the failure is raised where the consumer pulls. ``close()`` stops the source and returns
only once it is closed: a change scan holds both snapshots open, and the abort that follows a failed
send must be able to remove them.
"""
from __future__ import annotations

import collections
import contextvars
import threading
from typing import Iterable, Iterator

from rcopy.extent import Extent

LIMIT = 1 << 16      # extents found and not yet taken, at most (a few MiB of memory)


class Ahead:
    """Iterates ``source`` on a thread of its own (in a copy of the caller's context, so the commands
    it runs count in the caller's ledger), up to ``limit`` extents ahead of the consumer."""

    def __init__(self, source: Iterable[Extent], *, limit: int = LIMIT, name: str = "rcopy-detect"):
        self._it = iter(source)             # here: a source that cannot even start fails its caller
        self._limit = limit
        self._found: collections.deque[Extent] = collections.deque()
        self._ready = threading.Condition()
        self._end = False                   # the source ran out or failed
        self._error: BaseException | None = None
        self._stop = False
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Extent]:
        return self

    def __next__(self) -> Extent:
        with self._ready:
            while not self._found and not self._end:
                self._ready.wait()
            if self._found:
                e = self._found.popleft()
                if len(self._found) == self._limit - 1:
                    self._ready.notify_all()
                return e
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration

    def close(self) -> None:
        """Stop the source and wait until it is closed (its current step, e.g. one read, ends first)."""
        with self._ready:
            self._stop = True
            self._ready.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        it = self._it
        error = None
        try:
            for e in it:
                with self._ready:
                    while len(self._found) >= self._limit and not self._stop:
                        self._ready.wait()
                    if self._stop:
                        break
                    self._found.append(e)
                    if len(self._found) == 1:
                        self._ready.notify_all()
        except BaseException as e:          # handed to the consumer, after what was found before it
            error = e
        try:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        except BaseException as e:
            error = error or e
        with self._ready:
            self._error = error
            self._end = True
            self._ready.notify_all()
