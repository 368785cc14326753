"""What the kernel says of a volume's node right now: stat and two sysfs files, no udev query and no
exec, cheap enough for every daemon loop and every sync's start (rcopy.app.devices). Kept apart from
rcopy.sys.udev so that a sync does not load pyudev to ask it."""
from __future__ import annotations

import dataclasses
import os
import stat

SECTOR = 512


def read_int(path: str, default: int) -> int:
    """An integer sysfs attribute, or ``default`` when it is missing or not a number."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def sysfs_dir(path: str, sysfs: str = "/sys") -> str | None:
    """``/sys/dev/block/MAJ:MIN`` of the block device at ``path``; None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _block_dir(st, sysfs) if stat.S_ISBLK(st.st_mode) else None


def _block_dir(st: os.stat_result, sysfs: str = "/sys") -> str:
    return os.path.join(sysfs, "dev", "block", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")


@dataclasses.dataclass(frozen=True)
class Presence:
    """A volume's node as the kernel has it. A regular file (the host simulator's volumes) counts as
    present with its length."""
    present: bool
    size: int = 0
    read_only: bool = False


def presence(path: str) -> Presence:
    try:
        st = os.stat(path)
    except OSError:
        return Presence(False)
    if stat.S_ISREG(st.st_mode):
        return Presence(True, st.st_size)
    if not stat.S_ISBLK(st.st_mode):
        return Presence(False)
    sysdir = _block_dir(st)
    if not os.path.isdir(sysdir):            # a node left behind by a device that is gone
        return Presence(False)
    return Presence(True, read_int(os.path.join(sysdir, "size"), 0) * SECTOR,
                    read_int(os.path.join(sysdir, "ro"), 0) == 1)
