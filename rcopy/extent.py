"""The unit every layer passes around: a byte range of a volume, either data or known zeroes.

Change sources (rcopy.changes) yield Extents, the transport writes them (data read from the new
snapshot, zero extents as NBD WRITE_ZEROES), the CLI prints them (``rcopy extents``).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator


@dataclasses.dataclass(frozen=True, order=True)
class Extent:
    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    def as_dict(self) -> dict:
        return {"offset": self.offset, "length": self.length, "zero": self.zero}


def coalesce(extents: Iterable[Extent], *, gap: int = 0, max_length: int | None = None) -> Iterator[Extent]:
    """Merge sorted extents that touch (or lie within ``gap`` bytes) and have the same kind.

    Zero and data extents are never merged with each other. A gap is only bridged between data extents
    (sending a little unchanged data beats another request); the bridged bytes are read from the new
    snapshot, so they are correct, only redundant. ``max_length`` caps a merged data extent, so a
    consumer that reads each one streams instead of waiting for the end of a long run; zero extents
    carry no payload and merge without a cap. Input must be sorted and non-overlapping: this is checked, because an
    out-of-order list means a parser bug upstream and silently merging it would hide lost blocks.
    """
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            raise ValueError(f"empty or negative extent {e}")
        if cur is not None and e.offset < cur.end:
            raise ValueError(f"extents out of order or overlapping: {cur} then {e}")
        if cur is not None and e.zero == cur.zero:
            allowed = gap if not e.zero else 0
            merged_len = e.end - cur.offset
            if e.offset - cur.end <= allowed and (max_length is None or e.zero or merged_len <= max_length):
                cur = Extent(cur.offset, merged_len, cur.zero)
                continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def total(extents: Iterable[Extent]) -> int:
    return sum(e.length for e in extents)
