"""The interfaces the engine drives; the engine sees nothing else of the system.

They live at the bottom of the package (beside model.py and extent.py), not inside rcopy.engine: the
back-ends and the transport implement them, and no module imports a layer above its own.

Implementations live outside rcopy.engine (rcopy.snapshot, rcopy.changes, rcopy.transport); unit tests
hand the engine fakes of these, the lab hands it the real ones (zrepl's driver over Planner/FS/Step).
Volumes and snapshots are named by block-device path (``/dev/VG/LV``); snapshot names follow the
reserved name space documented in rcopy/engine/DESIGN.md (``rcopy.<group>.<volume>.<kind><gen>``).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Protocol, Sequence

from rcopy.extent import Extent


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A point-in-time copy of one volume, owned by rcopy."""

    origin: str          # device path of the volume, e.g. /dev/vg0/data
    name: str            # LV name of the snapshot, e.g. rcopy.g1.data.P3
    path: str            # device path of the snapshot, e.g. /dev/vg0/rcopy.g1.data.P3
    backend: str         # "thin" or "cow" (classic dm-snapshot)


class Snapshotter(Protocol):
    """Takes, checks, deletes and rolls back snapshots. Every method is idempotent.

    A group cut across back-ends (rcopy.snapshot.cut) asks each back-end for ``existing`` and
    ``prepare``; ``cut`` is the same for one back-end alone.
    """

    backend: str

    def cut(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot]:
        """Snapshot every (origin path, snapshot name) at one instant (crash-consistent across all)."""

    def existing(self, requests: Sequence[tuple[str, str]]) -> list[Snapshot] | None:
        """All of them, when every snapshot asked for exists and is complete; else None."""

    def prepare(self, requests: Sequence[tuple[str, str]], *, idle: bool = False):
        """This back-end's share of a group cut (a rcopy.snapshot.cut.CutPart), prepared; ``idle``:
        nobody writes the origins, so nothing needs suspending."""

    def find(self, origin: str, name: str) -> Snapshot | None:
        """The snapshot of that name on that origin, or None if it does not exist."""

    def valid(self, snap: Snapshot) -> bool:
        """False when the snapshot can no longer serve as a base (e.g. an overflowed dm-snapshot)."""

    def delete(self, snap: Snapshot) -> None:
        """Remove the snapshot; a missing one is not an error."""

    def delete_all(self, snaps: Sequence[Snapshot]) -> None:
        """Remove several at once (one command where the tool allows)."""

    def rollback(self, snap: Snapshot) -> None:
        """Make the origin read exactly as the snapshot; the snapshot is consumed."""


class ChangeSource(Protocol):
    def changed(self, old: Snapshot, new: Snapshot, *, block_size: int = 4096,
                remote=None) -> Iterator[Extent]:
        """Sorted, non-overlapping extents of ``new`` that differ from ``old`` (zero runs marked).
        ``remote`` (rcopy.changes.digest.Remote) asks the backup for its digests of candidate blocks:
        a source may use it to read ``new`` only (thin does), or ignore it."""

    def unchanged_since(self, base: Snapshot, origin: str) -> bool:
        """True only when nothing was written to ``origin`` since ``base`` was taken, known from
        metadata without a new snapshot or a data read; False when something was, or it cannot tell.
        An optional ``check_commands`` attribute says how many external commands it runs (cheapest
        asked first)."""


class Backend(Protocol):
    """One kind of volume (thin, cow, file): how to snapshot it, find its changes, read it whole."""

    name: str
    snapshotter: Snapshotter
    changes: ChangeSource

    def full(self, snap: Snapshot) -> Iterator[Extent]:
        """Every block of the snapshot, lazily (zero runs as zero extents)."""


class Sender(Protocol):
    def send(self, source_path: str, extents: Iterable[Extent], export: "ExportInfo",
             progress=None) -> int:
        """Write each extent of source_path to the export (zero extents as write-zeroes), then flush.

        Returns the payload bytes sent. Raises a LinkError subclass when the connection is lost.
        """

    # Optional (the engine looks them up): ``prepare(exports)`` opens the connections of a sync's exports
    # ahead of their sends, ``release()`` closes those no send took, ``cancel(reason)`` fails every send
    # in progress at once (rcopy.transport.sender.NbdSender has all three).


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """Where the backup exports one secondary for the duration of a sync."""

    host: str
    port: int
    name: str
    size: int
    # PEM of the throw-away self-signed certificate the backup's export made for this session, handed
    # over by the control channel; the client pins exactly it. None for plain NBD (loopback only).
    # (Python's ssl module has no TLS-PSK, hence X.509 with pinning instead of a pre-shared key.)
    tls_cert_pem: str | None = None
    # (certificate file, key file) of the primary's own throw-away certificate for this session, sent to
    # the backup in ``begin``: nbdkit admits only the client that presents it (--tls-verify-peer).
    client_cert: tuple[str, str] | None = None
    # every write must cover whole blocks of this size (a thin pool that does not zero new blocks, with
    # blocks larger than the export can read-modify-write itself): the primary rounds its writes out
    # and reads the whole blocks from its snapshot. 0: any size.
    write_align: int = 0
    # the same export on the backup's other links, (host, port) each: the sender spreads its connections
    # over them and goes on over the others when one link is lost (design §2.9)
    more: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        # over the control channel the tuples arrive as JSON lists
        object.__setattr__(self, "more", tuple((str(h), int(p)) for h, p in self.more))
        if self.client_cert is not None:
            object.__setattr__(self, "client_cert", tuple(self.client_cert))

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every (host, port) serving this export, the control channel's link first."""
        return ((self.host, self.port), *self.more)
