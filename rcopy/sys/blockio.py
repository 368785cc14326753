"""Reading a volume or snapshot by offset: the one read-until-full loop over a file descriptor.

``os.preadv`` may return less than asked (a signal, the end of a device, a partial O_DIRECT read); a
caller that needs every byte loops. The scanner (rcopy.changes.scan) and the NBD sender
(rcopy.transport.sender) both do, through ``read_exactly``, so a failing or shrinking device is
reported the same way everywhere: a typed error naming the path and the offset (the engine marks that
volume stale instead of sending garbage).
"""
from __future__ import annotations

import errno
import os
from typing import Callable

from rcopy.errors import DeviceError


class ReadError(DeviceError):
    """read error on {path} at offset {offset} ({reason}): the device is failing or went away"""


class ShortRead(DeviceError):
    """{path} ended early, at offset {offset}: the device shrank or failed"""


def read_exactly(fd: int, view: memoryview, offset: int, length: int, *, path: str, align: int = 0,
                 on_unaligned: Callable[[], None] | None = None) -> None:
    """Fill ``view[:length]`` from ``offset``. With ``align`` (O_DIRECT) each read is rounded up to it
    within the view (the tail of a file may be unaligned: ask for more, take what comes); an EINVAL
    then calls ``on_unaligned`` (which drops O_DIRECT) and the read is retried buffered."""
    got = 0
    while got < length:
        want = length - got
        if align:
            want = min(-(-want // align) * align, len(view) - got)
        try:
            n = os.preadv(fd, [view[got:got + want]], offset + got)
        except OSError as e:
            if e.errno == errno.EINVAL and align and on_unaligned is not None:
                on_unaligned()
                align = 0
                continue
            raise ReadError(path=path, offset=offset + got, reason=e.strerror) from None
        if n == 0:
            raise ShortRead(path=path, offset=offset + got)
        got += n
