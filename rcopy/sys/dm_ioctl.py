"""device-mapper's control interface (``/dev/mapper/control``): suspend, resume and target messages
without starting a process.

These are the calls of every sync's cut (suspend and resume each origin, two thin-pool messages) and
of thin change detection (reserve/release the metadata snapshot): run through ``dmsetup`` they cost a
process each, 0.3-1 s in the TCG lab and 5-20 ms on hardware (issue 15 counted 8 per sync on the
primary, 6 on the backup). The ioctl is the one dmsetup itself uses (linux/dm-ioctl.h, interface
version 4); only the commands rcopy needs are spoken. Errors come back typed as the dmsetup
wrapper's (:mod:`rcopy.sys.dmsetup`), which delegates here.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

CONTROL = "/dev/mapper/control"
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev, name[128], uuid[129], data[7]: 312 bytes, no implicit padding.
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
VERSION = (4, 0, 0)                 # the kernel accepts any 4.x caller asking for 4.0.0
DEV_SUSPEND, DEV_STATUS, TARGET_MSG = 6, 7, 14     # DM_DEV_SUSPEND_CMD, DM_DEV_STATUS_CMD, DM_TARGET_MSG_CMD
SUSPEND_FLAG, NOFLUSH_FLAG = 1 << 1, 1 << 11
BUFFER_FULL_FLAG, DATA_OUT_FLAG = 1 << 8, 1 << 16
MSG_HEADER = struct.Struct("=Q")    # struct dm_target_msg: sector, then the message text
OUT_SPACE = 16384                   # room for a message's reply


class DmIoctlError(OSError):
    """The kernel refused the call: ``errno`` says why (ENXIO: no such device)."""


def request(cmd: int) -> int:
    """_IOWR(0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def pack(name: str, flags: int = 0, payload: bytes = b"", space: int = 0) -> bytearray:
    """The header (data at its end, aligned to 8) followed by ``payload`` and ``space`` spare bytes."""
    raw = name.encode()
    if not raw or len(raw) >= 128 or b"\0" in raw:
        raise DmIoctlError(errno.EINVAL, f"bad device-mapper name {name!r}")
    size = HEADER.size + len(payload) + space
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, *VERSION, size, HEADER.size, 0, 0, flags, 0, 0, 0, raw, b"", b"")
    buf[HEADER.size:HEADER.size + len(payload)] = payload
    return buf


def flags_of(buf: bytearray) -> int:
    return HEADER.unpack_from(buf)[7]


def reply_of(buf: bytearray) -> str:
    """The text a target message left at ``data_start`` (empty when it wrote nothing)."""
    if not flags_of(buf) & DATA_OUT_FLAG:
        return ""
    start = HEADER.unpack_from(buf)[4]
    return bytes(buf[start:]).split(b"\0", 1)[0].decode(errors="replace")


def _call(cmd: int, buf: bytearray) -> bytearray:
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DmIoctlError(e.errno, f"cannot open {CONTROL}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, request(cmd), buf, True)
    except OSError as e:
        raise DmIoctlError(e.errno, e.strerror) from None
    finally:
        os.close(fd)
    return buf


def suspend(name: str, *, flush: bool = True) -> None:
    _call(DEV_SUSPEND, pack(name, SUSPEND_FLAG | (0 if flush else NOFLUSH_FLAG)))


def resume(name: str) -> None:
    _call(DEV_SUSPEND, pack(name))


def open_count(name: str) -> int:
    """How many openers the device has now (DM_DEV_STATUS; what ``dmsetup info`` shows as Open)."""
    return HEADER.unpack_from(_call(DEV_STATUS, pack(name)))[6]


def message(name: str, msg: str, sector: int = 0) -> str:
    payload = MSG_HEADER.pack(sector) + msg.encode() + b"\0"
    buf = _call(TARGET_MSG, pack(name, payload=payload, space=OUT_SPACE))
    if flags_of(buf) & BUFFER_FULL_FLAG:
        raise DmIoctlError(errno.ENOSPC, f"the reply to {msg!r} does not fit in {OUT_SPACE} bytes")
    return reply_of(buf)
