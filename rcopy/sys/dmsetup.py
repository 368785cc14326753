"""device-mapper wrapper: suspend, resume, message and a table's mode through the control device
(rcopy.sys.dm_ioctl: no process per call; a table is read back that way too), status and info through
dmsetup.

The only module that drives device-mapper. Table and status lines are parsed into :class:`Line` values;
the targets rcopy reads (snapshot, snapshot-merge, thin-pool) get typed status parsers that follow the
kernel's Documentation/admin-guide/device-mapper/{snapshot,thin-provisioning}.rst.
Suspend and resume are idempotent: the kernel treats a second suspend (or resume) as a no-op.
"""
from __future__ import annotations

import dataclasses
import errno
import os

from rcopy.errors import NotFound, ToolError
from rcopy.poll import until
from rcopy.sys import interrupts
from rcopy.sys.run import Result, describe, run

TIMEOUT = 60.0


class DmError(ToolError):
    """{msg}"""


class DmNotFound(NotFound):
    """device-mapper device {name} not found: check 'dmsetup ls'"""


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of ``dmsetup table`` or ``dmsetup status``: a target over a sector range."""

    start: int
    length: int
    target: str
    args: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SnapshotStatus:
    """Status of a snapshot / snapshot-merge target.

    ``valid`` is False once the COW store overflowed or an I/O error invalidated it (status "Invalid");
    "Overflow" (kernel >= 4.4 with no space left) is also not usable as a base.
    """

    valid: bool
    overflow: bool
    allocated_sectors: int = 0
    total_sectors: int = 0
    metadata_sectors: int = 0
    state: str = ""


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    """Status of a thin-pool target; ``held_root`` is the reserved metadata snapshot's block or None."""

    transaction: int
    used_metadata: int
    total_metadata: int
    used_data: int
    total_data: int
    held_root: int | None
    mode: str


def _dm(*args: str, check: bool = True) -> Result:
    return run(["dmsetup", *args], check=check, error=DmError, timeout=TIMEOUT)


def _missing(res: Result) -> bool:
    return "No such device" in res.stderr or "not exist" in res.stderr


def _checked(name: str, res: Result) -> Result:
    if res.ok:
        return res
    if _missing(res):
        raise DmNotFound(name=name)
    raise DmError(describe(res))


def parse_lines(text: str) -> list[Line]:
    """Parse table/status output of ONE device: ``START LENGTH TARGET ARGS...`` per line."""
    out = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        f = raw.split()
        if len(f) < 3 or not f[0].isdigit() or not f[1].isdigit():
            raise DmError(f"unexpected dmsetup line: {raw!r}")
        out.append(Line(int(f[0]), int(f[1]), f[2], tuple(f[3:])))
    return out


def parse_all(text: str) -> dict[str, list[Line]]:
    """Parse table/status output of ALL devices: ``NAME: START LENGTH TARGET ARGS...`` per line."""
    out: dict[str, list[Line]] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        name, sep, rest = raw.partition(": ")
        if not sep:
            raise DmError(f"unexpected dmsetup line: {raw!r}")
        out.setdefault(name, []).extend(parse_lines(rest))
    return out


def parse_snapshot_status(line: Line) -> SnapshotStatus:
    """snapshot status: ``<allocated>/<total> <metadata>``, or ``Invalid``, ``Overflow``, ``Merge failed``."""
    if line.target not in ("snapshot", "snapshot-merge"):
        raise DmError(f"not a snapshot target: {line.target}")
    words = " ".join(line.args)
    if not line.args or line.args[0] in ("Invalid", "Overflow") or words == "Merge failed":
        return SnapshotStatus(valid=False, overflow=words == "Overflow", state=words or "unknown")
    try:
        alloc, total = (int(x) for x in line.args[0].split("/"))
        meta = int(line.args[1]) if len(line.args) > 1 else 0
    except ValueError:
        raise DmError(f"unexpected snapshot status: {words!r}") from None
    return SnapshotStatus(True, False, alloc, total, meta, "active")


def parse_pool_status(line: Line) -> PoolStatus:
    """thin-pool status: ``<transaction> <used>/<total meta> <used>/<total data> <held root|-> rw|ro ...``."""
    a = line.args
    if line.target != "thin-pool" or len(a) < 5:
        raise DmError(f"unexpected thin-pool status: {line}")
    if a[0] == "Fail":
        return PoolStatus(0, 0, 0, 0, 0, None, "fail")
    try:
        um, tm = (int(x) for x in a[1].split("/"))
        ud, td = (int(x) for x in a[2].split("/"))
        held = None if a[3] == "-" else int(a[3])
        return PoolStatus(int(a[0]), um, tm, ud, td, held, a[4])
    except ValueError:
        raise DmError(f"unexpected thin-pool status: {' '.join(a)!r}") from None


def status(name: str) -> list[Line]:
    return parse_lines(_checked(name, _dm("status", name, check=False)).stdout)


def exists(name: str) -> bool:
    res = _dm("info", name, check=False)
    if res.ok:
        return True
    if _missing(res):
        return False
    raise DmError(describe(res))


def info(name: str) -> dict[str, str]:
    """Selected ``dmsetup info -c`` columns: name, blkdevname, major, minor, open, suspended, attr."""
    cols = "name,blkdevname,major,minor,open,suspended,attr"
    res = _checked(name, _dm("info", "-c", "--noheadings", "--separator", "|", "-o", cols, name,
                             check=False))
    vals = res.stdout.strip().split("|")
    return dict(zip(cols.split(","), (v.strip() for v in vals)))


def _ioctl(name: str, what: str, fn, *args, **kw):
    from rcopy.sys import dm_ioctl
    try:
        return fn(name, *args, **kw)
    except dm_ioctl.DmIoctlError as e:
        if e.errno == errno.ENXIO:
            raise DmNotFound(name=name) from None
        raise DmError(f"device-mapper {what} of {name} failed: {e.strerror}") from None


def suspend(name: str, *, flush: bool = True) -> None:
    """Suspend NAME: in-flight I/O completes (and, with flush, a filesystem on it is frozen), new I/O
    is queued until resume. Suspending a suspended device is a no-op."""
    from rcopy.sys import dm_ioctl
    _ioctl(name, "suspend", dm_ioctl.suspend, flush=flush)


def resume(name: str) -> None:
    """Resume NAME (releasing queued I/O); resuming a running device is a no-op."""
    from rcopy.sys import dm_ioctl
    _ioctl(name, "resume", dm_ioctl.resume)


def open_count(name: str) -> int:
    """How many openers NAME has right now (no process started)."""
    from rcopy.sys import dm_ioctl
    return _ioctl(name, "status", dm_ioctl.open_count)


def set_writable(name: str, writable: bool, *, hidden: bool = False) -> int | None:
    """Reload NAME's live table, unchanged but in the other mode, when it is not in ``writable``'s
    already; returns the device's number if it changed (for ``udev.dm_events_processed``), else None.
    The swap suspends the device for its moment (flushing what is in flight) and sets the kernel's
    read-only flag, which refuses writers from then on. The resume's udev event carries the flags
    LVM's activation gives the device (``hidden``: an LVM layer such as ``-real``, no /dev/VG link),
    so udev's rules put back the links the read-only flag's own event took away."""
    from rcopy.sys import dm_ioctl
    readonly, devno = _ioctl(name, "status", dm_ioctl.mode)
    if readonly != writable:
        return None
    flags = dm_ioctl.UDEV_PRIMARY_SOURCE | dm_ioctl.UDEV_DISABLE_LIBRARY_FALLBACK
    if hidden:
        flags |= (dm_ioctl.UDEV_DISABLE_SUBSYSTEM_RULES | dm_ioctl.UDEV_DISABLE_DISK_RULES
                  | dm_ioctl.UDEV_DISABLE_OTHER_RULES)
    targets = _ioctl(name, "table", dm_ioctl.table)
    with interrupts.deferred():          # not a loaded table left waiting for a resume that never came
        _ioctl(name, "table load", dm_ioctl.load, targets, readonly=not writable)
        _ioctl(name, "resume", dm_ioctl.resume, udev_flags=flags)
    return devno


def wait_closed(name: str, seconds: float, poll: float = 0.2) -> bool:
    """Wait up to ``seconds`` for NAME to have no opener; True once it has none."""
    return bool(until(lambda: True if not open_count(name) else None, seconds, poll))


def message(name: str, msg: str, sector: int = 0) -> str:
    """Send a target message (e.g. thin-pool 'reserve_metadata_snap'); returns the target's reply."""
    from rcopy.sys import dm_ioctl
    return _ioctl(name, f"message {msg!r}", dm_ioctl.message, msg, sector)


def suspended_name(path: str, sysfs: str = "/sys") -> str | None:
    """The dm name of the device at ``path`` if it is a suspended device-mapper device, else None.

    Read from sysfs (``/sys/dev/block/MAJ:MIN/dm/{name,suspended}``), so checking every volume of a
    group before each run costs no command.
    """
    from rcopy.sys.nodes import sysfs_dir
    node = sysfs_dir(path, sysfs)
    if node is None:
        return None
    base = os.path.join(node, "dm")
    try:
        with open(os.path.join(base, "suspended")) as f:
            flag = f.read().strip()
        with open(os.path.join(base, "name")) as f:
            name = f.read().strip()
    except OSError:
        return None
    return name if flag == "1" else None


def resume_suspended(paths) -> list[str]:
    """Resume every device among ``paths`` left suspended (a cut killed by SIGKILL or a power cut of
    the process, not of the host); returns the dm names resumed."""
    names = list(dict.fromkeys(n for p in paths if (n := suspended_name(p))))
    for name in names:
        resume(name)
    return names
