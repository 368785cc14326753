"""The registry of snapshot back-ends: each bundles a snapshotter, a change source and rollback.

A volume's back-end is decided ONCE, when it is admitted (``probe``), and stored with the volume pair
with the device's stable identity; every later call names it (``get``), so nothing probes udev or LVM
per call. Back-ends: ``thin`` (LVM thin snapshots, changes from thin_delta), ``cow`` (classic
dm-snapshot of thick LVs, changes from the COW exception table), ``file`` (regular files: the simulator
the host tests run the whole CLI on). ``cut`` takes one group cut across back-ends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from typing import Iterable, Iterator, Sequence

from rcopy.ports import ChangeSource, Snapshot, Snapshotter
from rcopy.errors import DeviceError, DeviceUnsafe, RcopyError, Refused
from rcopy.extent import Extent
from rcopy.snapshot import file as filesnap

KINDS = ("thin", "cow", "file")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    snapshotter: Snapshotter
    changes: ChangeSource

    def full(self, snap: Snapshot) -> Iterator[Extent]:
        """Every block of the snapshot, lazily: data as data, zero runs as zero extents (a full sync)."""
        from rcopy.changes.scan import scan
        return scan(None, snap.path)


@dataclasses.dataclass(frozen=True)
class Probe:
    kind: str
    identity: str


_made: dict[str, Backend] = {}
_lock = threading.Lock()


def _make(name: str) -> Backend:
    if name == "thin":
        from rcopy.changes.thin import ThinChanges
        from rcopy.snapshot.thin import ThinSnapshotter
        return Backend(name, ThinSnapshotter(), ThinChanges())
    if name == "cow":
        from rcopy.changes.cow import CowChanges
        from rcopy.snapshot.cow import CowSnapshotter
        return Backend(name, CowSnapshotter(), CowChanges())
    if name == "file":
        from rcopy.changes.refine import FullCompare
        return Backend(name, filesnap.FileSnapshotter(), FullCompare())
    raise Refused(f"unknown snapshot back-end {name!r}: known are {', '.join(KINDS)}")


def get(name: str) -> Backend:
    """The back-end of that name (one instance per process)."""
    with _lock:
        if name not in _made:
            _made[name] = _make(name)
        return _made[name]


def probe(path: str) -> Probe:
    """Which back-end the volume at ``path`` needs, and its stable identity (at admit only)."""
    from rcopy.snapshot.select import backend_name
    return Probe(*backend_name(path))


def for_device(path: str) -> Backend:
    """The back-end of a device not (yet) admitted: probes it (tools and tests)."""
    return get(probe(path).kind)


def cut(requests: Sequence[tuple[str, str, str]], *, reuse: bool = True, idle: bool = False) -> list[Snapshot]:
    """ONE cut of (back-end, origin, snapshot name) across back-ends (rcopy.snapshot.cut); the
    snapshots come back in request order. ``idle``: origins nobody writes (one lvcreate each)."""
    from rcopy.snapshot.cut import take
    order: dict[str, list[tuple[str, str]]] = {}
    for kind, origin, name in requests:
        order.setdefault(kind, []).append((origin, name))
    snaps = take([(get(kind).snapshotter, reqs) for kind, reqs in order.items()], reuse=reuse, idle=idle)
    by_name = {s.name: s for s in snaps}
    return [by_name[name] for _, _, name in requests]


def find(kind: str, origin: str, name: str) -> Snapshot | None:
    return get(kind).snapshotter.find(origin, name)


def delete(requests: Iterable[tuple[str, str, str]]) -> int:
    """Delete every existing (back-end, origin, name) snapshot; returns how many existed. Back-ends
    that remove the same way (thin and cow: one ``lvremove`` of many LVs) are batched together."""
    per: dict[object, tuple[Snapshotter, list[Snapshot]]] = {}
    for kind, origin, name in requests:
        snapper = get(kind).snapshotter
        snap = snapper.find(origin, name)
        if snap is not None:
            per.setdefault(type(snapper).delete_all, (snapper, []))[1].append(snap)
    for snapper, snaps in per.values():
        snapper.delete_all(snaps)
    return sum(len(s) for _, s in per.values())


LVM_KINDS = ("thin", "cow")


def mark_of(group: str, generation: int, sync_id: str) -> str:
    """The tag a secondary carries for the sync point it holds: the base's identity lives with the
    data, so a backup whose state was lost, or a secondary replaced by hand, is noticed."""
    return f"rcopy:{group}:{generation}:{sync_id}"


def marks(volumes: Sequence[tuple[str, str]], group: str) -> dict[str, str | None]:
    """path -> the group's mark on that secondary ('' when it has none), None where the kind keeps
    no marks (files)."""
    from rcopy.sys import lvm
    out: dict[str, str | None] = {}
    for kind, path in volumes:
        if kind not in LVM_KINDS:
            out[path] = None
            continue
        lv = lvm.by_path(path)
        out[path] = next((t for t in lv.tags if t.startswith(f"rcopy:{group}:")), "")
    return out


def resolve(volumes: Sequence[tuple[str, str]]) -> dict:
    """path -> its LV (rcopy.sys.lvm.LV) for the LVM kinds among (back-end, path) pairs, from the
    current report: what ``protect`` needs, read before a change drops the report."""
    from rcopy.sys import lvm
    return {path: lvm.by_path(path) for kind, path in volumes if kind in LVM_KINDS}


def protect(volumes: Sequence[tuple[str, str]], *, writable: bool, group: str = "", mark: str = "",
            known: dict | None = None) -> dict:
    """Secondaries are read-only to everyone but rcopy's own sync: LVM permission r, and between syncs
    their live tables too (``open_for_sync`` opened them for one sync without telling LVM); ``mark``
    replaces the group's previous mark. One lvchange for all of them, none when only the live tables
    change. ``known``: path -> LV as ``resolve`` (or an earlier ``protect``) gave it, so no report is
    read; returns the same for what it changed, as they now are."""
    from rcopy.sys import lvm
    known = known or {}
    paths = [path for kind, path in volumes if kind in LVM_KINDS]
    lvs = [known.get(path) or lvm.by_path(path) for path in paths]
    drop = tuple(t for lv in lvs for t in lv.tags if t.startswith(f"rcopy:{group}:") and t != mark) if mark else ()
    now = lvm.set_access(lvs, writable=writable, drop_tags=drop, add_tag=mark)
    if not writable:
        _set_live(lvs, writable=False)
    return dict(zip(paths, now))


def open_for_sync(volumes: Sequence[tuple[str, str]], *, known: dict | None = None) -> dict:
    """Let one sync write the secondaries. LVM's metadata keeps them read-only, so a reboot, a
    re-activation or a crash of the backup finds them read-only; only the kernel's live tables are
    reloaded read-write, by ioctl (``protect(writable=False)`` reloads them read-only). An
    ``lvchange -p rw`` committed LVM's metadata and reloaded each LV through udev: ~1.2 s per LV each
    way in the lab. An LV whose device stack rcopy does not know, or that is not active, is made
    writable by LVM as before. Returns path -> LV as ``protect`` takes it back."""
    from rcopy.sys import lvm
    known = known or {}
    lvs = {path: known.get(path) or lvm.by_path(path) for kind, path in volumes if kind in LVM_KINDS}
    rest = [path for path, lv in lvs.items() if not lv.active or lvm.dm_layers(lv) is None]
    _set_live([lv for path, lv in lvs.items() if path not in rest], writable=True)
    return {**lvs, **dict(zip(rest, lvm.set_access([lvs[p] for p in rest], writable=True)))}


def _set_live(lvs, *, writable: bool) -> None:
    """Each LV's device-mapper tables in that mode (see ``open_for_sync``): writable from the lowest
    layer up, read-only from the top down; layers that are not there are skipped. A read-only flip
    returns once udev has put back the /dev/VG/LV links the kernel's read-only event made it remove;
    a writable one removes none (checked in the lab), so it does not wait on udev."""
    from rcopy.sys import dmsetup, lvm, udev
    with udev.dm_events_processed(wait=not writable) as expect:
        for lv in lvs:
            layers = lvm.dm_layers(lv) or []
            for name in (layers if writable else layers[::-1]):
                try:
                    devno = dmsetup.set_writable(name, writable, hidden=name != lv.dm_name)
                except dmsetup.DmNotFound:
                    if writable and name == lv.dm_name:
                        raise
                    continue
                if devno is not None:
                    expect(devno)


def digest(path: str) -> str:
    """sha256 of a whole volume or snapshot (``rcopy verify``)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
    except OSError as e:
        raise DeviceError(f"cannot read {path} to verify it: {e.strerror}") from None
    return h.hexdigest()


def volume_size(path: str) -> int:
    return filesnap.volume_size(path)


def check_secondary(path: str, size: int, *, force: bool = False, nosync: bool = False) -> None:
    """Refuse a secondary that is missing, of another size, or holds data (design §2.10) unless forced."""
    have = volume_size(path)
    if have != size:
        raise Refused(f"secondary {path} is {have} bytes but the primary volume is {size} bytes: "
                      "give a secondary of the same size")
    from rcopy.safety import check_writable
    check_writable(path, expected_size=size, force=force)
    if filesnap.is_file_volume(path) and not (force or nosync) and filesnap.has_data(path):
        raise DeviceUnsafe(f"refusing to overwrite {path}: it holds data (non-zero bytes); "
                           "use --force to overwrite it, or --nosync if it already equals the primary")


def kept(volumes: Sequence[tuple[str, str, str]], group: str, kinds: str = "FK") -> dict[str, list[str]]:
    """path -> the group's snapshots of ``kinds`` of each (back-end, path, volume name) (F: the base a
    side took when it took over, K: the writes a demoted primary took after its last sync point, kept
    for the administrator), oldest first. Found by name: a thin snapshot loses its origin link when
    another snapshot is merged into the origin."""
    from rcopy.names import parse
    out: dict[str, list[str]] = {}
    for kind, path, vname in volumes:
        try:
            if kind in LVM_KINDS:
                from rcopy.sys import lvm
                names = [lv.name for lv in lvm.lvs(lvm.by_path(path).vg)]
            else:
                names = filesnap.snapshots_of(path)
        except (RcopyError, OSError):
            names = []                  # a volume gone or unreadable has nothing to list (status goes on)
        mine = [parse(n) for n in names]
        out[path] = [str(s) for s in sorted((s for s in mine if s and s.group == group and s.volume == vname
                                             and s.kind in kinds), key=lambda s: (s.generation, s.kind))]
    return out


def busy(paths: Iterable[str]) -> list[str]:
    """'PATH: why' for each device in use (mounted, held, open): what a rollback or a final sync must
    not run under."""
    from rcopy.safety import in_use
    return [f"{p}: {why}" for p in paths if (why := in_use(p))]


def write_granule(volumes: Sequence[tuple[str, str]]) -> int:
    """The write size the secondaries need: a thin pool that does not zero new blocks (-Zn, common for
    speed) leaves stale data in the rest of a block that a smaller write provisions, so every write to
    such a secondary must cover whole pool blocks (the export then read-modify-writes); 0: any size."""
    from rcopy.sys import lvm
    granule = 0
    for kind, path in volumes:
        if kind != "thin":
            continue
        lv = lvm.by_path(path)
        pool = lvm.get(lv.vg, lv.pool) if lv.pool else None
        if pool is not None and not pool.zero:
            granule = max(granule, pool.chunk_size or 65536)
    return granule


def unmap_granules(volumes: Sequence[tuple[str, str]], sysfs: str = "/sys") -> dict[str, int]:
    """Secondaries whose zero runs may unmap whole pool blocks instead of writing zeroes (rcopy's nbdkit
    unmap filter), with the block size: a thin LV with no origin (an external origin would show through
    an unmapped block), in a pool that zeroes new blocks (-Zy: a later partial write to an unmapped
    block gets zeroes around it, not stale data), whose queue takes discards (a pool with discards
    ignored does not). A thin secondary then holds what its primary holds, not its whole size."""
    from rcopy.sys import lvm
    from rcopy.sys.nodes import read_int
    out: dict[str, int] = {}
    for kind, path in volumes:
        if kind != "thin":
            continue
        lv = lvm.by_path(path)
        pool = lvm.get(lv.vg, lv.pool) if lv.pool else None
        if lv.segtype != "thin" or lv.origin or pool is None or not pool.zero:
            continue
        queue = _queue_dir(path, sysfs)
        if queue is None or read_int(os.path.join(queue, "discard_max_bytes"), 0) <= 0:
            continue
        granule = max(read_int(os.path.join(queue, "discard_granularity"), 0), pool.chunk_size or 0)
        if granule >= 512 and granule & (granule - 1) == 0:
            out[path] = granule
    return out


def _queue_dir(path: str, sysfs: str) -> str | None:
    from rcopy.sys.nodes import sysfs_dir
    node = sysfs_dir(path, sysfs)
    return None if node is None else os.path.join(node, "queue")


def used_bytes(kind: str, path: str) -> int:
    """Bytes a full copy of the volume may allocate on a thin secondary: a thin volume's mapped data,
    the whole size of anything else."""
    size = volume_size(path)
    if kind == "thin":
        from rcopy.sys import lvm
        return min(size, int(size * lvm.by_path(path).data_percent / 100.0) + (1 << 20))
    return size


def create_secondary(spec: str, name: str, size: int, used: int) -> str:
    """Create a secondary for a primary volume of ``size`` bytes (3PAR admitrcopyvv -createvv): thick
    in VG, or thin in VG/POOL when ``spec`` names a pool; returns its path. Refused, with the numbers,
    when the name exists or the space is short (``used``: what the primary holds, what a full copy
    allocates in a pool that zeroes new blocks)."""
    from rcopy.errors import AlreadyExists, NoSpace, NotFound
    from rcopy.sys import lvm
    vg_name, _, pool = spec.partition("/")
    lvm.check_name(vg_name)
    lvm.check_name(name)
    vg = lvm.vg(vg_name)
    if vg is None:
        raise NotFound(f"volume group {vg_name} not found: give an existing VG (or VG/POOL) to --create")
    if lvm.get(vg_name, name) is not None:
        raise AlreadyExists(f"{vg_name}/{name} already exists: give another name (TARGET:NAME), "
                            "or admit that LV without --create")
    if size % vg.extent_size:
        raise Refused(f"the primary volume is {size} bytes, not a multiple of {vg_name}'s extent size "
                      f"({vg.extent_size} bytes): create a secondary of exactly {size} bytes by hand")
    mib = 1 << 20
    if pool:
        p = lvm.get(vg_name, pool)
        if p is None or p.segtype != "thin-pool":
            raise NotFound(f"thin pool {vg_name}/{pool} not found: give an existing pool as VG/POOL")
        free = int(p.size * (1 - p.data_percent / 100.0))
        # a zeroing pool gets what the primary holds (zero runs unmap: unmap_granules); one that does not
        # zero (-Zn) gets the zeroes written, so a full copy allocates the whole volume
        need, what = ((used, "the primary holds") if p.zero else
                      (size, "a full copy into a pool without zeroing (-Zn) allocates"))
        if need > free:
            raise NoSpace(f"thin pool {vg_name}/{pool} has {free // mib} MiB free, {what} "
                          f"{need // mib} MiB: extend the pool or pick another")
    elif size > vg.free:
        raise NoSpace(f"volume group {vg_name} has {vg.free // mib} MiB free, {name} needs {size // mib} MiB: "
                      "extend the VG or pick another")
    return lvm.create_volume(vg_name, name, size, pool=pool).path


def remove_created(path: str) -> None:
    """Undo ``create_secondary`` (its admit failed): the LV is rcopy's own and holds nothing yet."""
    from rcopy.sys import lvm
    lv = lvm.by_path(path)
    lvm.remove(lv.vg, lv.name)
