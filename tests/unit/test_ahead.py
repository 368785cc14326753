"""rcopy.engine.ahead: change detection on its own thread keeps the source's order, errors and closing."""
from __future__ import annotations

import contextvars
import threading

import pytest

from rcopy.engine.ahead import Ahead
from rcopy.errors import DeviceError
from rcopy.extent import Extent


def extents(n: int):
    return [Extent(i * 8192, 4096, zero=bool(i % 3 == 0)) for i in range(n)]


def test_every_extent_comes_through_in_order_however_far_ahead_it_may_run():
    want = extents(1000)
    assert list(Ahead(iter(want), limit=7)) == want
    assert list(Ahead(iter(want))) == want
    assert list(Ahead(iter([]))) == []


def test_what_was_found_before_a_failure_comes_first_then_the_failure():
    def source():
        yield from extents(5)
        raise DeviceError("reading /dev/vg/snap at offset 40960 failed")

    it = Ahead(source(), limit=2)
    assert [next(it) for _ in range(5)] == extents(5)
    with pytest.raises(DeviceError, match="offset 40960"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_the_source_and_returns_only_once_it_is_closed():
    closed = threading.Event()
    pulled = []

    def source():
        try:
            for e in extents(10_000):
                pulled.append(e)
                yield e
        finally:
            closed.set()

    it = Ahead(source(), limit=4)
    assert next(it) == extents(1)[0]
    it.close()
    assert closed.is_set()
    assert len(pulled) <= 4 + 2          # it waited for the consumer, it did not read on to the end


def test_close_waits_for_the_step_the_source_is_in():
    step = threading.Event()
    closed = threading.Event()

    def source():
        try:
            yield Extent(0, 4096)
            step.wait()                  # e.g. one read of a slow disk, or the backup's digests
            yield Extent(8192, 4096)
        finally:
            closed.set()

    it = Ahead(source())
    assert next(it) == Extent(0, 4096)
    closer = threading.Thread(target=it.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and not closed.is_set()
    step.set()
    closer.join()
    assert closed.is_set()


def test_a_source_that_fails_to_close_says_so():
    class Source:
        def __iter__(self):
            return self

        def __next__(self):
            raise StopIteration

        def close(self):
            raise DeviceError("cannot release the pool's metadata snapshot")

    with pytest.raises(DeviceError, match="metadata snapshot"):
        list(Ahead(Source()))


def test_a_source_that_cannot_start_fails_its_caller_at_once():
    class Source:
        def __iter__(self):
            raise DeviceError("cannot open /dev/vg/snap")

    with pytest.raises(DeviceError, match="cannot open"):
        Ahead(Source())


def test_the_source_runs_in_the_callers_context():
    ledger = contextvars.ContextVar("ledger", default=None)
    seen = []

    def source():
        seen.append(ledger.get())
        yield Extent(0, 4096)

    ledger.set("this sync's ledger")
    assert list(Ahead(source())) == [Extent(0, 4096)]
    assert seen == ["this sync's ledger"]
