"""device-mapper's control interface (``/dev/mapper/control``): suspend, resume, target messages and
a table's reload in another mode, without starting a process.

These are the calls of every sync's cut (suspend and resume each origin, two thin-pool messages) and
of thin change detection (reserve/release the metadata snapshot), and the backup's secondaries
made writable for a sync and read-only after it: run through ``dmsetup`` they cost a process each,
0.3-1 s in the TCG lab and 5-20 ms on hardware (issue 15 counted 8 per sync on the primary, 6 on the
backup). The ioctl is the one dmsetup itself uses (linux/dm-ioctl.h, interface
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
# DM_DEV_SUSPEND_CMD, DM_DEV_STATUS_CMD, DM_TABLE_LOAD_CMD, DM_TABLE_STATUS_CMD, DM_TARGET_MSG_CMD
DEV_SUSPEND, DEV_STATUS, TABLE_LOAD, TABLE_STATUS, TARGET_MSG = 6, 7, 9, 12, 14
READONLY_FLAG, SUSPEND_FLAG, STATUS_TABLE_FLAG, NOFLUSH_FLAG = 1 << 0, 1 << 1, 1 << 4, 1 << 11
BUFFER_FULL_FLAG, DATA_OUT_FLAG = 1 << 8, 1 << 16
# libdevmapper's udev flags (libdm/libdevmapper.h), read back by its udev rules ('dmsetup udevflags'):
# a resume without them after a read-only flip leaves LVM's /dev/VG/LV links removed (55-dm.rules
# disables the subsystem rules on the kernel's DISK_RO=1 event and only a primary source re-enables them)
UDEV_DISABLE_SUBSYSTEM_RULES, UDEV_DISABLE_DISK_RULES, UDEV_DISABLE_OTHER_RULES = 0x02, 0x04, 0x08
UDEV_DISABLE_LIBRARY_FALLBACK, UDEV_PRIMARY_SOURCE = 0x20, 0x40
UDEV_FLAGS_SHIFT = 16
MSG_HEADER = struct.Struct("=Q")    # struct dm_target_msg: sector, then the message text
OUT_SPACE = 16384                   # room for a message's reply (or a table)
# struct dm_target_spec: sector_start, length, status, next, target_type[16]; its parameters follow it
# as a NUL-terminated string, and the next spec starts 8-aligned
SPEC = struct.Struct("=QQiI16s")


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


def resume(name: str, *, udev_flags: int = 0) -> None:
    """Resume (swapping in a loaded table). ``udev_flags`` (UDEV_*) ride in the event's cookie
    (event_nr), as libdevmapper sends them, with no semaphore to wait on (base 0)."""
    buf = pack(name)
    struct.pack_into("=I", buf, 32, udev_flags << UDEV_FLAGS_SHIFT)     # event_nr
    _call(DEV_SUSPEND, buf)


def open_count(name: str) -> int:
    """How many openers the device has now (DM_DEV_STATUS; what ``dmsetup info`` shows as Open)."""
    return _status(name)[6]


def _status(name: str) -> tuple:
    """The header fields DM_DEV_STATUS fills in (open count, flags, dev)."""
    return HEADER.unpack_from(_call(DEV_STATUS, pack(name)))


def mode(name: str) -> tuple[bool, int]:
    """Whether the live table of the device is read-only (the kernel's disk flag, set at each swap),
    and the device's number (st_rdev form)."""
    fields = _status(name)
    return bool(fields[7] & READONLY_FLAG), decode_dev(fields[10])


def decode_dev(dev: int) -> int:
    """The kernel's huge_encode_dev (minor's low byte, major, minor's high bits) as an st_rdev."""
    return os.makedev((dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def table(name: str) -> list[tuple[int, int, str, str]]:
    """The live table, as (start, length, target, parameters) per target: what ``dmsetup table`` prints,
    in the form a load takes back."""
    buf = _call(TABLE_STATUS, pack(name, STATUS_TABLE_FLAG, space=OUT_SPACE))
    if flags_of(buf) & BUFFER_FULL_FLAG:
        raise DmIoctlError(errno.ENOSPC, f"the table of {name} does not fit in {OUT_SPACE} bytes")
    return parse_table(buf)


def parse_table(buf: bytearray) -> list[tuple[int, int, str, str]]:
    """The targets of a DM_TABLE_STATUS reply (each ``next`` counts from the start of the data area)."""
    fields = HEADER.unpack_from(buf)
    start, count = fields[4], fields[5]
    out, at = [], start
    for _ in range(count):
        sector, length, _status, nxt, kind = SPEC.unpack_from(buf, at)
        params = bytes(buf[at + SPEC.size:]).split(b"\0", 1)[0].decode()
        out.append((sector, length, kind.split(b"\0", 1)[0].decode(), params))
        at = start + nxt
    return out


def pack_table(name: str, targets: list[tuple[int, int, str, str]], *, readonly: bool) -> bytearray:
    """A DM_TABLE_LOAD request for ``targets`` in the given mode (each ``next`` counts from the spec
    before it, the first from the start of the header, as the kernel reads a load)."""
    body = bytearray()
    for sector, length, kind, params in targets:
        raw = params.encode() + b"\0"
        size = -(-(SPEC.size + len(raw)) // 8) * 8
        spec = SPEC.pack(sector, length, 0, size, kind.encode()[:15])
        body += spec + raw + bytes(size - len(spec) - len(raw))
    buf = pack(name, READONLY_FLAG if readonly else 0, payload=bytes(body))
    struct.pack_into("=I", buf, 20, len(targets))           # target_count
    return buf


def load(name: str, targets: list[tuple[int, int, str, str]], *, readonly: bool) -> None:
    """Load ``targets`` as the inactive table; the next resume swaps it in (suspending around it)."""
    _call(TABLE_LOAD, pack_table(name, targets, readonly=readonly))


def message(name: str, msg: str, sector: int = 0) -> str:
    payload = MSG_HEADER.pack(sector) + msg.encode() + b"\0"
    buf = _call(TARGET_MSG, pack(name, payload=payload, space=OUT_SPACE))
    if flags_of(buf) & BUFFER_FULL_FLAG:
        raise DmIoctlError(errno.ENOSPC, f"the reply to {msg!r} does not fit in {OUT_SPACE} bytes")
    return reply_of(buf)
