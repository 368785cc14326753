"""pyudev face: block devices as plain data, and waiting for device nodes.

The only module that imports pyudev. A :class:`BlockDevice` is built at once from the udev database
and sysfs (size, logical block size, DEVTYPE, device-mapper names, holders), so nothing else holds a
pyudev object (blivet's ``device_to_dict`` habit).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import time

import pyudev

from rcopy.errors import DeviceError, NotFound
from rcopy.poll import until
from rcopy.sys.nodes import SECTOR, read_int

log = logging.getLogger("rcopy")
UDEV_CONTROL = "/run/udev/control"          # systemd-udevd's control socket: udev is running


class DeviceNotFound(NotFound):
    """block device {path} not found: check the path (lsblk)"""


class DeviceTimeout(DeviceError):
    """device node {path} did not appear within {timeout} s after it was created"""


@dataclasses.dataclass(frozen=True)
class BlockDevice:
    devnode: str
    sys_name: str            # e.g. dm-3, vdb
    major: int
    minor: int
    size: int                # bytes
    logical_block_size: int
    devtype: str             # disk / partition
    dm_name: str = ""
    dm_vg: str = ""
    dm_lv: str = ""
    dm_layer: str = ""       # e.g. cow, real, tpool for LVM-internal devices
    holders: tuple[str, ...] = ()

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def is_lvm(self) -> bool:
        return bool(self.dm_vg and self.dm_lv)


def _context() -> pyudev.Context:
    return pyudev.Context()


def _to_block_device(dev: pyudev.Device) -> BlockDevice:
    props = dev.properties
    sysdir = dev.sys_path
    lbs = read_int(os.path.join(sysdir, "queue", "logical_block_size"), SECTOR)
    holders_dir = os.path.join(sysdir, "holders")
    holders = tuple(sorted(os.listdir(holders_dir))) if os.path.isdir(holders_dir) else ()
    return BlockDevice(
        devnode=dev.device_node or "", sys_name=dev.sys_name,
        major=os.major(dev.device_number), minor=os.minor(dev.device_number),
        size=read_int(os.path.join(sysdir, "size"), 0) * SECTOR, logical_block_size=lbs,
        devtype=props.get("DEVTYPE", ""), dm_name=props.get("DM_NAME", "") or _read_str(sysdir, "dm/name"),
        dm_vg=props.get("DM_VG_NAME", ""), dm_lv=props.get("DM_LV_NAME", ""),
        dm_layer=props.get("DM_LV_LAYER", ""), holders=holders)


def _read_str(sysdir: str, rel: str) -> str:
    try:
        with open(os.path.join(sysdir, rel)) as f:
            return f.read().strip()
    except OSError:
        return ""


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device(path: str) -> BlockDevice:
    """The block device at ``path`` (any node or symlink to it); DeviceNotFound otherwise."""
    if not is_block_device(path):
        raise DeviceNotFound(path=path)
    try:
        dev = pyudev.Devices.from_device_file(_context(), os.path.realpath(path))
    except (pyudev.DeviceNotFoundError, ValueError, OSError):
        raise DeviceNotFound(path=path) from None
    return _to_block_device(dev)


def by_devno(major: int, minor: int) -> BlockDevice:
    try:
        dev = pyudev.Devices.from_device_number(_context(), "block", os.makedev(major, minor))
    except (pyudev.DeviceNotFoundError, ValueError):
        raise DeviceNotFound(path=f"{major}:{minor}") from None
    return _to_block_device(dev)


def wait_for(path: str, *, timeout: float = 30.0, poll: float = 0.1) -> BlockDevice:
    """Wait until ``path`` is a block device that udev has processed (the 'udevadm settle' we need)."""
    def ready() -> BlockDevice | None:
        if is_block_device(path):
            try:
                dev = pyudev.Devices.from_device_file(_context(), os.path.realpath(path))
                if dev.is_initialized:
                    return _to_block_device(dev)
            except (pyudev.DeviceNotFoundError, ValueError, OSError):
                pass
        return None

    dev = until(ready, timeout, poll)
    if dev is None:
        raise DeviceTimeout(path=path, timeout=timeout)
    return dev


def watch_block(on_event) -> "pyudev.MonitorObserver":
    """Call ``on_event(action, devnode)`` from a pyudev monitor thread for every block device event
    (add, remove, change: a resize or a read-only flip). The caller stops it with ``.stop()``. OSError
    when netlink is not available (a container without udev)."""
    monitor = pyudev.Monitor.from_netlink(_context())
    monitor.filter_by("block")
    observer = pyudev.MonitorObserver(monitor, callback=lambda d: on_event(d.action or "", d.device_node or ""),
                                      name="udev-watch", daemon=True)
    observer.start()
    return observer


@contextlib.contextmanager
def dm_events_processed(*, wait: bool = True, timeout: float = 15.0):
    """Yield ``expect(devno)``; on leaving the block (normally), wait until udev has processed, for each
    device expected, a device-mapper 'change' carrying a cookie (``DM_COOKIE``, rcopy.sys.dm_ioctl's
    resume). libdevmapper waits the same way on a semaphore; without the wait a read-only flip would
    return while udev still had LVM's /dev/VG/LV link removed, and a writer to that path meanwhile
    would create a plain file in its place. ``wait=False``, or no udev daemon running (a container: no
    /run/udev/control): no wait. Past ``timeout``, a warning and no more wait."""
    pending: set[int] = set()
    monitor = None
    if wait and os.path.exists(UDEV_CONTROL):
        try:
            monitor = pyudev.Monitor.from_netlink(_context())
            monitor.filter_by("block")
            monitor.start()
        except (OSError, ValueError) as e:
            log.warning("no udev monitor (%s): not waiting for device-mapper events", e)
            monitor = None
    yield pending.add
    deadline = time.monotonic() + timeout
    while monitor is not None and pending and (left := deadline - time.monotonic()) > 0:
        dev = monitor.poll(timeout=left)
        if dev is not None and dev.action == "change" and dev.properties.get("DM_COOKIE"):
            pending.discard(dev.device_number)
    if pending and monitor is not None:
        log.warning("udev did not report %d device-mapper change(s) within %.0f s: their /dev links may lag",
                    len(pending), timeout)
