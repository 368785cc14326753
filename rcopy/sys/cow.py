"""The dm-snapshot persistent COW store, declared as data and decoded generically.

Follows the kernel's drivers/md/dm-snap-persistent.c and Documentation/admin-guide/device-mapper/
snapshot.rst. Layout of the COW device, in chunks of ``chunk_size`` sectors:

    chunk 0                  header: magic 'SnAp' (0x70416e53 LE), valid, version (1), chunk_size
    chunk 1                  metadata area 0: (old_chunk u64 LE, new_chunk u64 LE) pairs, chunk_bytes/16
    chunks 2 .. 1+E          the E data chunks that area 0 describes
    chunk 2+E                metadata area 1, then its E data chunks, and so on

The table ends at the first pair whose new_chunk is 0 (chunk 0 is the header, so it can never be data);
a completely full area continues into the next one. ``old_chunk`` is the origin chunk that was copied
out before the origin wrote it: the list of every chunk written to the origin since the snapshot.
The kernel writes it through its own bio path, so the page cache of the -cow device can be stale:
read it with O_DIRECT (:func:`read_device`).
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Callable, Iterator

from rcopy.errors import DeviceError

SECTOR = 512
MAGIC = 0x70416E53
VERSION = 1
HEADER_CHUNKS = 1

# Field tables: (name, struct code). Little-endian, no padding, as the kernel's __le32/__le64 structs.
HEADER_FIELDS = (("magic", "I"), ("valid", "I"), ("version", "I"), ("chunk_size", "I"))
EXCEPTION_FIELDS = (("old_chunk", "Q"), ("new_chunk", "Q"))


def _struct(fields) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code in fields))


HEADER = _struct(HEADER_FIELDS)
EXCEPTION = _struct(EXCEPTION_FIELDS)


class CowFormatError(DeviceError):
    """{msg}"""


@dataclasses.dataclass(frozen=True)
class Header:
    magic: int
    valid: int
    version: int
    chunk_size: int     # sectors

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_size * SECTOR

    @property
    def exceptions_per_area(self) -> int:
        return self.chunk_bytes // EXCEPTION.size


@dataclasses.dataclass(frozen=True)
class Exception_:
    old_chunk: int
    new_chunk: int


@dataclasses.dataclass(frozen=True)
class Table:
    header: Header
    exceptions: tuple[Exception_, ...]

    @property
    def valid(self) -> bool:
        return self.header.valid == 1

    def old_chunks(self) -> list[int]:
        """Origin chunks with an exception, sorted, unique."""
        return sorted({e.old_chunk for e in self.exceptions})


def decode(fields, st: struct.Struct, buf: bytes, offset: int = 0) -> dict:
    return dict(zip((name for name, _ in fields), st.unpack_from(buf, offset)))


def encode(fields, st: struct.Struct, values: dict) -> bytes:
    return st.pack(*(values[name] for name, _ in fields))


def parse_header(buf: bytes, *, where: str = "COW device") -> Header:
    if len(buf) < HEADER.size:
        raise CowFormatError(f"{where}: header truncated ({len(buf)} bytes)")
    h = Header(**decode(HEADER_FIELDS, HEADER, buf))
    if h.magic != MAGIC:
        raise CowFormatError(f"{where}: no dm-snapshot header (magic {h.magic:#x}, expected {MAGIC:#x}); "
                             f"is it a persistent snapshot's -cow device?")
    if h.version != VERSION:
        raise CowFormatError(f"{where}: unsupported dm-snapshot COW version {h.version} (rcopy reads {VERSION})")
    if h.chunk_size == 0 or h.chunk_size & (h.chunk_size - 1):
        raise CowFormatError(f"{where}: bad chunk size {h.chunk_size} sectors")
    return h


def area_chunk(header: Header, area: int) -> int:
    """Chunk index of metadata area ``area`` (dm-snap-persistent.c area_location)."""
    return HEADER_CHUNKS + (header.exceptions_per_area + 1) * area


def parse_area(header: Header, buf: bytes) -> tuple[list[Exception_], bool]:
    """Exceptions of one metadata area and whether the area is full (the table goes on)."""
    out = []
    for i in range(header.exceptions_per_area):
        e = Exception_(**decode(EXCEPTION_FIELDS, EXCEPTION, buf, i * EXCEPTION.size))
        if e.new_chunk == 0:
            return out, False
        out.append(e)
    return out, True


def parse_table(read_at: Callable[[int, int], bytes], size: int, *, where: str = "COW device") -> Table:
    """Decode a whole COW store through ``read_at(offset, length)``; ``size`` bounds the areas."""
    header = parse_header(read_at(0, max(HEADER.size, SECTOR)), where=where)
    cb = header.chunk_bytes
    if not header.valid:
        return Table(header, ())
    total_chunks = size // cb
    exceptions: list[Exception_] = []
    area = 0
    while True:
        chunk = area_chunk(header, area)
        if chunk >= total_chunks:
            break      # a full last area fills the device exactly
        found, full = parse_area(header, read_at(chunk * cb, cb))
        for e in found:
            if not (chunk < e.new_chunk < total_chunks):
                raise CowFormatError(f"{where}: exception {e} points outside area {area}'s data chunks")
        exceptions.extend(found)
        if not full:
            break
        area += 1
    return Table(header, tuple(exceptions))


def extents(table: Table) -> Iterator[tuple[int, int]]:
    """(offset, length) byte ranges of the origin written since the snapshot, sorted, merged."""
    cb = table.header.chunk_bytes
    start = prev = None
    for c in table.old_chunks():
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            yield start * cb, (prev - start + 1) * cb
        start = prev = c
    if start is not None:
        yield start * cb, (prev - start + 1) * cb


def read_device(path: str, *, direct: bool = True) -> Table:
    """Read the COW store of a -cow device (O_DIRECT by default, bypassing a stale page cache)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CowFormatError(f"COW device {path} not found: is the snapshot active?") from None
    except OSError as e:
        raise CowFormatError(f"cannot open COW device {path}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)

        def read_at(offset: int, length: int) -> bytes:
            length = -(-length // 4096) * 4096
            buf = mmap.mmap(-1, length)      # page aligned, as O_DIRECT needs
            try:
                n = os.preadv(fd, [buf], offset)
                return bytes(buf[:n])
            except OSError as e:
                raise CowFormatError(f"cannot read COW device {path} at {offset}: {e.strerror}") from None
            finally:
                buf.close()

        return parse_table(read_at, size, where=path)
    finally:
        os.close(fd)
