"""The refine split across two hosts: the backup hashes what it holds, the primary reads only the new side.

thin_delta marks 64 KiB chunks, and 1 % of 4 KiB blocks written at random touches ~15 % of them; the
local refine (rcopy.changes.refine) reads every candidate chunk twice on the primary, from the base
and from the new snapshot, to find the 4 KiB blocks that changed. Here the backup reads the same
candidates from its secondary and answers one 128-bit BLAKE2b digest per block while the primary
hashes the new snapshot's blocks; a block goes out when the digests differ. The primary reads half as
much, and the two halves run on two hosts at once (rcopy/DESIGN.md §3, "Refine").

What is compared is what the backup holds, not the primary's idea of it: a block is skipped only when
the secondary already has its bytes (a collision, 2^-128 per block, aside). The secondary of a volume
is written only after its digests are answered (this refine yields nothing before), so nothing of this
sync changes what was hashed. Any failure of the remote half (an older agent, a lost link, a read error
there) falls back to the local refine for the candidates not yet compared.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence

from rcopy.changes.refine import refine
from rcopy.changes.scan import Source, block_spans
from rcopy.errors import RcopyError, UsageError
from rcopy.extent import Extent, coalesce

log = logging.getLogger("rcopy.changes.digest")

DIGEST_SIZE = 16             # bytes per block digest (BLAKE2b-128)
BATCH_BLOCKS = 4096          # blocks per request: 16 MiB read on each side, 64 KiB of digests back
MAX_BLOCKS = 16384           # the most one request may ask (its answer stays well under a control line)
PIECE = 1 << 20              # one O_DIRECT read
DEPTH = 4                    # reads in flight (the lab's disks: 14 MB/s with one, 18 with eight)

Spans = Sequence[tuple[int, int]]
# remote(spans) sends the request and returns what waits for its answer: the digests of the spans' blocks
Remote = Callable[[Spans], Callable[[], bytes]]


class BadSpans(UsageError):
    """digest request: {why}"""


def batches(spans: Iterable[tuple[int, int]], *, block_size: int = 4096,
            limit: int | None = None) -> Iterator[list[tuple[int, int]]]:
    """The spans in groups of at most ``limit`` (BATCH_BLOCKS) blocks; a long span is split."""
    limit = limit or BATCH_BLOCKS
    batch, blocks = [], 0
    for start, end in spans:
        while start < end:
            take = min(end - start, (limit - blocks) * block_size)
            batch.append((start, start + take))
            blocks += take // block_size
            start += take
            if blocks == limit:
                yield batch
                batch, blocks = [], 0
    if batch:
        yield batch


def check_spans(spans, size: int, *, block_size: int = 4096, limit: int = MAX_BLOCKS) -> list[tuple[int, int]]:
    """Spans as a peer sent them (JSON), checked: sorted, block-aligned, inside the device, bounded."""
    out, prev, blocks = [], 0, 0
    if not isinstance(spans, list):
        raise BadSpans(why="spans is not a list")
    for s in spans:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(type(x) is int for x in s)):
            raise BadSpans(why=f"span {s!r} is not [start, end]")
        start, end = s
        if start < prev or end <= start or start % block_size or end % block_size or end > size:
            raise BadSpans(why=f"span [{start}, {end}] is unsorted, empty, unaligned or past the end ({size})")
        blocks += (end - start) // block_size
        if blocks > limit:
            raise BadSpans(why=f"more than {limit} blocks asked at once")
        out.append((start, end))
        prev = end
    return out


def _pieces(spans: Spans) -> list[tuple[int, int]]:
    return [(off, min(PIECE, end - off)) for start, end in spans for off in range(start, end, PIECE)]


def hashes(source: Source, spans: Spans, *, block_size: int = 4096, zeros: bool = False) -> tuple[bytes, bytes]:
    """The digests of every block of ``spans`` in order, and with ``zeros`` one byte per block (1: all
    zero). Reads run DEPTH at once; hashlib releases the GIL on blocks this size."""
    zero = bytes(block_size)

    def piece(p: tuple[int, int]) -> tuple[bytes, bytes]:
        off, length = p
        buf = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
        try:
            source.read_into(buf, off, length)
            view = memoryview(buf)
            try:
                blocks = [view[i:i + block_size] for i in range(0, length, block_size)]
                out = b"".join(hashlib.blake2b(b, digest_size=DIGEST_SIZE).digest() for b in blocks)
                flags = bytes(b == zero for b in blocks) if zeros else b""
                for b in blocks:
                    b.release()
                return out, flags
            finally:
                view.release()
        finally:
            buf.close()

    with ThreadPoolExecutor(DEPTH, thread_name_prefix="rcopy-digest") as pool:
        parts = list(pool.map(piece, _pieces(spans)))
    return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)


def digests_of(path: str, spans, *, block_size: int = 4096) -> bytes:
    """The backup's half: digests of the blocks of ``spans`` (checked) of the device at ``path``."""
    source = Source.open(path, direct=True)
    try:
        return hashes(source, check_spans(spans, source.size, block_size=block_size), block_size=block_size)[0]
    finally:
        source.close()


def refine_remote(old_path: str, new_path: str, candidates: Iterable[Extent], remote: Remote, *,
                  block_size: int = 4096, size: int | None = None) -> Iterator[Extent]:
    """Changed extents of ``new_path`` within the candidates, against the digests ``remote`` answers;
    the local refine (old and new read here) for whatever the remote half could not answer. Lazy
    like the local refine: one batch of spans is held at a time, however long the candidate list."""
    new = Source.open(new_path, direct=True)
    size = new.size if size is None else size
    todo = batches(block_spans(candidates, size, block_size), block_size=block_size)
    return coalesce(_refine(old_path, new, todo, remote, block_size, size))


def _refine(old_path, new: Source, todo: Iterator[Spans], remote: Remote, block_size: int,
            size: int) -> Iterator[Extent]:
    asked, rest = 0, None
    try:
        for batch in todo:
            try:
                answer = _ask(remote, batch)
                mine, zeros = hashes(new, batch, block_size=block_size, zeros=True)  # (a read error here is ours)
                theirs = _answer(answer, len(mine))
            except _Fallback as e:
                log.warning("%s: the backup's digests failed (%s): comparing with the base here instead",
                            new.path, e.__cause__ or e)
                rest = itertools.chain([batch], todo)
                break
            asked += len(mine) // DIGEST_SIZE
            yield from _differing(batch, mine, theirs, zeros, block_size)
    finally:
        new.close()
    log.debug("%s: %d candidate blocks compared with the backup's digests%s", new.path, asked,
              ", the rest here" if rest is not None else "")
    if rest is not None:
        yield from refine(old_path, new.path, (Extent(s, e - s) for batch in rest for s, e in batch),
                          block_size=block_size, size=size)


class _Fallback(Exception):
    """The remote half did not answer usably (its cause says why): the local refine takes over."""


def _ask(remote: Remote, batch: Spans) -> Callable[[], bytes]:
    try:
        return remote(batch)
    except RcopyError as e:
        raise _Fallback() from e


def _answer(answer: Callable[[], bytes], expected: int) -> bytes:
    try:
        theirs = answer()
    except RcopyError as e:
        raise _Fallback() from e
    if len(theirs) != expected:
        raise _Fallback(f"{len(theirs)} bytes of digests for {expected}")
    return theirs


def _differing(spans: Spans, mine: bytes, theirs: bytes, zeros: bytes, block_size: int) -> Iterator[Extent]:
    i = 0
    for start, end in spans:
        for off in range(start, end, block_size):
            a = i * DIGEST_SIZE
            if mine[a:a + DIGEST_SIZE] != theirs[a:a + DIGEST_SIZE]:
                yield Extent(off, block_size, bool(zeros[i]))
            i += 1
