"""pylibblkid face: what signature a device holds, as plain data.

The only module that imports ``blkid``. Superblock probing covers filesystems, LVM PVs, RAID members,
swap, LUKS...; partition probing catches partition tables. A probe that finds nothing returns None.
"""
from __future__ import annotations

import dataclasses

import blkid as _blkid

from rcopy.errors import DeviceError


class ProbeError(DeviceError):
    """cannot probe {path} for signatures: {why}"""


@dataclasses.dataclass(frozen=True)
class Signature:
    type: str        # e.g. ext4, LVM2_member, linux_raid_member, swap, or a partition table type
    usage: str       # filesystem, raid, crypto, other, or 'partition table'
    label: str = ""
    uuid: str = ""

    def describe(self) -> str:
        return f"{self.type} ({self.usage})" if self.usage else self.type


def probe(path: str) -> Signature | None:
    """The signature found on ``path``, or None when the device looks blank."""
    p = _blkid.Probe()
    try:
        p.set_device(path)
    except (RuntimeError, OSError) as e:
        raise ProbeError(path=path, why=str(e)) from None
    p.enable_superblocks(True)
    p.set_superblocks_flags(_blkid.SUBLKS_TYPE | _blkid.SUBLKS_USAGE | _blkid.SUBLKS_LABEL | _blkid.SUBLKS_UUID)
    p.enable_partitions(True)
    p.set_partitions_flags(_blkid.PARTS_MAGIC)
    try:
        found = p.do_safeprobe()
    except (RuntimeError, OSError) as e:
        # libblkid refuses to choose between two signatures (ambivalent probe): that is not blank.
        return Signature("ambivalent", "other", uuid=str(e))
    if not found:
        return None
    vals = dict(p.items())
    if "PTTYPE" in vals and "TYPE" not in vals:
        return Signature(vals["PTTYPE"], "partition table")
    return Signature(vals.get("TYPE", "unknown"), vals.get("USAGE", ""), vals.get("LABEL", ""),
                     vals.get("UUID", ""))
