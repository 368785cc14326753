"""Checks before rcopy writes a device (design §2.10): refuse what could hold someone's data.

A device is refused when it holds a signature (filesystem, LVM PV, RAID member, swap, partition
table...), is mounted, has holders (dm/md stacked on it), is open by another process, or does not have
the expected size. Each refusal is one line naming the device and the reason; ``force`` overrides all
but a missing device and a device too small for the data. Nothing here writes.
"""
from __future__ import annotations

import dataclasses
import errno
import os

from rcopy.errors import DeviceUnsafe, NotFound, Refused
from rcopy.sys import blkid, udev


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the checks saw; returned so callers can log it."""

    path: str
    size: int
    logical_block_size: int


class TooSmall(Refused):
    """{msg}"""


def _unsafe(path: str, reason: str) -> DeviceUnsafe:
    return DeviceUnsafe(f"refusing to overwrite {path}: {reason} (use --force only if you mean it)")


def mounts_of(devno: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points whose source is the device major:minor."""
    out = []
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == devno:
                    out.append(fields[4])
    except OSError:
        pass
    return out


def openers_of(rdev: int, proc: str = "/proc") -> list[int]:
    """PIDs (other than ours) with an open file descriptor on the block device ``rdev``."""
    me, pids = os.getpid(), []
    try:
        entries = os.listdir(proc)
    except OSError:
        return pids
    for pid in entries:
        if not pid.isdigit() or int(pid) == me:
            continue
        fddir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue       # gone, or not ours to look at
        for fd in fds:
            try:
                st = os.stat(os.path.join(fddir, fd))
            except OSError:
                continue
            if st.st_rdev == rdev and (st.st_mode & 0o170000) == 0o060000:
                pids.append(int(pid))
                break
    return pids


def exclusive_busy(path: str) -> bool:
    """True when the kernel refuses an O_EXCL open: mounted, or claimed by dm/md/another O_EXCL user."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def _check_size(path: str, size: int, expected: int | None, force: bool) -> None:
    if expected is None or size == expected:
        return
    if size < expected:
        raise TooSmall(f"refusing to overwrite {path}: it has {size} bytes, the volume needs {expected}; "
                       f"use a device of the same size")
    if not force:
        raise _unsafe(path, f"size {size} bytes differs from the volume's {expected}")


def _check_file(path: str, expected_size: int | None, force: bool) -> Checked:
    """A regular file (the file back-end): size and signature only."""
    size = os.path.getsize(path)
    _check_size(path, size, expected_size, force)
    if not force and size:
        sig = blkid.probe(path)
        if sig is not None:
            raise _unsafe(path, f"holds a {sig.describe()} signature")
    return Checked(path, size, 512)


def in_use(path: str, dev=None) -> str:
    """Why the block device at ``path`` is in use (mounted, held, open by a process), "" when it is
    not. Files (the host simulator) are never in use."""
    if not udev.is_block_device(path):
        return ""
    dev = dev or udev.device(path)
    mounts = mounts_of(dev.devno)
    if mounts:
        return f"mounted on {mounts[0]}"
    if dev.holders:
        return f"in use by {', '.join(dev.holders)} (holders)"
    if exclusive_busy(path):
        return "open exclusively by another user (mounted, or claimed by the kernel)"
    pids = openers_of(os.stat(path).st_rdev)
    if pids:
        return f"open by process {', '.join(map(str, pids[:5]))}"
    return ""


def check_writable(path: str, *, expected_size: int | None = None, force: bool = False) -> Checked:
    """Raise NotFound, TooSmall or DeviceUnsafe unless ``path`` may be overwritten; return what was seen."""
    if not os.path.exists(path):
        raise NotFound(f"device {path} not found: check the path")
    if not udev.is_block_device(path):
        return _check_file(path, expected_size, force)
    dev = udev.device(path)
    _check_size(path, dev.size, expected_size, force)
    if force:
        return Checked(path, dev.size, dev.logical_block_size)
    busy = in_use(path, dev)
    if busy:
        raise _unsafe(path, busy)
    sig = blkid.probe(path)
    if sig is not None:
        raise _unsafe(path, f"holds a {sig.describe()} signature")
    return Checked(path, dev.size, dev.logical_block_size)
