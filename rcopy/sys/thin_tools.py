"""thin-provisioning-tools wrapper: ``thin_delta`` and a strict reader of its XML.

The only module that runs thin_delta. Ranges are in thin (virtual) blocks of the pool's
``data_block_size`` sectors. The reader is strict the way borg's scripts/lvm-thin-map.py is: unknown
elements, unsorted or overlapping ranges, or a diff of other devices than asked are errors, because
a silently mis-read delta means blocks that never reach the secondary.
"""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from rcopy.errors import ToolError
from rcopy.sys.run import run

SECTOR = 512
KINDS = ("same", "different", "left_only", "right_only")
CHANGED = frozenset(("different", "left_only", "right_only"))
TIMEOUT = 600.0


class ThinDeltaError(ToolError):
    """{msg}"""


@dataclasses.dataclass(frozen=True)
class Range:
    kind: str       # one of KINDS
    begin: int      # first thin block
    length: int     # blocks

    @property
    def end(self) -> int:
        return self.begin + self.length


@dataclasses.dataclass(frozen=True)
class Delta:
    left: int                   # thin device id of snap1
    right: int                  # thin device id of snap2
    data_block_size: int        # sectors per block
    ranges: tuple[Range, ...]

    @property
    def block_bytes(self) -> int:
        return self.data_block_size * SECTOR

    def changed(self) -> list[Range]:
        """Ranges whose mapping differs: candidates for a block compare."""
        return [r for r in self.ranges if r.kind in CHANGED]


def _int_attr(el: ET.Element, name: str) -> int:
    v = el.get(name)
    if v is None or not v.isdigit():
        raise ThinDeltaError(f"thin_delta XML: <{el.tag}> has no valid '{name}' attribute ({v!r})")
    return int(v)


def parse_delta_xml(text: str, *, left: int | None = None, right: int | None = None) -> Delta:
    """Parse ``thin_delta`` XML; check ids when given, sortedness and non-overlap always."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ThinDeltaError(f"thin_delta XML does not parse: {e}") from None
    if root.tag != "superblock":
        raise ThinDeltaError(f"thin_delta XML: root element is <{root.tag}>, expected <superblock>")
    dbs = _int_attr(root, "data_block_size")
    diffs = list(root)
    if len(diffs) != 1 or diffs[0].tag != "diff":
        raise ThinDeltaError("thin_delta XML: expected exactly one <diff> in <superblock>")
    diff = diffs[0]
    got_left, got_right = _int_attr(diff, "left"), _int_attr(diff, "right")
    if (left is not None and got_left != left) or (right is not None and got_right != right):
        raise ThinDeltaError(f"thin_delta XML compares devices {got_left}->{got_right}, "
                             f"expected {left}->{right}")
    ranges: list[Range] = []
    for el in diff:
        if el.tag not in KINDS:
            raise ThinDeltaError(f"thin_delta XML: unknown element <{el.tag}>")
        r = Range(el.tag, _int_attr(el, "begin"), _int_attr(el, "length"))
        if r.length <= 0:
            raise ThinDeltaError(f"thin_delta XML: empty range {r}")
        if ranges and r.begin < ranges[-1].end:
            raise ThinDeltaError(f"thin_delta XML: ranges unsorted or overlapping: {ranges[-1]} then {r}")
        ranges.append(r)
    return Delta(got_left, got_right, dbs, tuple(ranges))


def thin_delta(metadata_dev: str, snap1: int, snap2: int, *, metadata_snap: bool = True) -> Delta:
    """Run ``thin_delta`` between two thin device ids of the pool whose metadata is ``metadata_dev``.

    With ``metadata_snap`` (required on a live pool) it reads the pool's reserved metadata snapshot,
    which the caller must have reserved (rcopy.changes.thin does, and releases it).
    """
    argv = ["thin_delta", *(("-m",) if metadata_snap else ()), "--snap1", str(snap1),
            "--snap2", str(snap2), metadata_dev]
    res = run(argv, check=True, error=ThinDeltaError, timeout=TIMEOUT)
    return parse_delta_xml(res.stdout, left=snap1, right=snap2)
