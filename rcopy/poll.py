"""Waiting for a condition that nothing announces: ask, sleep, ask again, until a deadline.

The one loop behind rcopy's waits for a lock, a device node, a device's last opener and a snapshot
merge, so each says only what it asks and what it does when time runs out.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def until(check: Callable[[], T | None], seconds: float, interval: float) -> T | None:
    """``check()`` every ``interval`` s until it returns something other than None (returned), or
    ``seconds`` have passed since the first ask (None; the last ask is made at or after the deadline)."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
