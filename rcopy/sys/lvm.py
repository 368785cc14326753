"""LVM2 command wrapper: lvs (JSON report), lvcreate, lvremove, lvrename, lvchange, lvconvert.

The only module that runs LVM tools. Reports are read with ``--reportformat json --units b --nosuffix
--binary`` so sizes are bytes and flags are 0/1, then turned into :class:`LV` values at once. Every
mutating call is idempotent: creating a snapshot that already exists with the same origin, or removing
one that is gone, succeeds quietly (zrepl's idempotent platform tests are the model).

LVM runs with ``devices/ignore_suspended_devices=1``: the group cut (rcopy/snapshot/cut.py) suspends
origins before it calls lvcreate, and LVM must not block trying to read a suspended device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading

from rcopy.errors import AlreadyExists, NotFound, Refused, ToolError
from rcopy.poll import until
from rcopy.sys import interrupts, lvm_shell
from rcopy.sys.run import Result, describe, run

LVM_CONFIG = "devices { ignore_suspended_devices = 1 scan_lvs = 0 }"
NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
FIELDS = ("vg_name", "lv_name", "lv_path", "lv_dm_path", "lv_attr", "lv_size", "segtype", "origin",
          "pool_lv", "thin_id", "chunk_size", "lv_active", "lv_skip_activation", "lv_snapshot_invalid",
          "lv_merging", "lv_merge_failed", "lv_device_open", "lv_suspended", "snap_percent",
          "vg_extent_size", "origin_size", "lv_uuid", "lv_tags", "vg_free", "data_percent", "metadata_percent",
          "zero", "vg_lock_type")
TIMEOUT = 120.0


class LvmError(ToolError):
    """{msg}"""


class LvNotFound(NotFound):
    """logical volume {lv} not found: check the name with 'lvs'"""


@dataclasses.dataclass(frozen=True)
class LV:
    """One row of ``lvs``, typed. ``origin`` is the LV name a snapshot was taken of ('' if none)."""

    vg: str
    name: str
    path: str
    dm_path: str
    attr: str
    size: int
    segtype: str
    origin: str
    pool: str
    thin_id: int | None
    chunk_size: int
    active: bool
    skip_activation: bool
    snapshot_invalid: bool
    merging: bool
    merge_failed: bool
    open: bool
    suspended: bool
    extent_size: int
    origin_size: int = 0     # for a snapshot: the size of its origin (``size`` is then the COW store's)
    uuid: str = ""           # LVM's stable identity of the LV (survives renames)
    tags: tuple[str, ...] = ()
    vg_free: int = 0         # bytes free in the LV's VG
    data_percent: float = 0.0       # thin pool (or thin LV): data space used
    metadata_percent: float = 0.0   # thin pool: metadata space used
    zero: bool = False              # thin pool: new blocks are zeroed (-Zy); without it a partial write
                                    # to a new block leaves stale data in the rest of the block
    lock_type: str = ""             # the VG's lvmlockd lock type (sanlock, dlm, idm): "" for a local VG

    @property
    def volume_size(self) -> int:
        """Bytes a reader of this LV sees: the origin's size for a classic snapshot."""
        return self.origin_size if self.is_cow_snapshot and self.origin_size else self.size

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def dm_name(self) -> str:
        return dm_name(self.vg, self.name)

    @property
    def is_thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def is_cow_snapshot(self) -> bool:
        """A classic (thick) snapshot: lv_attr type 's' (or 'S' when invalid), not thin."""
        return self.attr[:1] in ("s", "S") and not self.is_thin


def dm_name(vg: str, lv: str, layer: str | None = None) -> str:
    """The device-mapper name LVM gives VG/LV: each '-' doubled, parts joined by '-' (libdm's rule)."""
    parts = [vg.replace("-", "--"), lv.replace("-", "--")]
    if layer:
        parts.append(layer)
    return "-".join(parts)


def dm_layers(lv: LV) -> list[str] | None:
    """The device-mapper devices that must all take writes for ``lv`` to, lowest first: a thin LV is one
    device; a linear or striped LV one, under which LVM puts a ``-real`` layer while it is the origin of
    classic snapshots (LVM gives both the LV's permission; a caller skips the layer when it is not there:
    a report read before a snapshot was taken would not say). None for other segment types, whose
    stacks LVM alone knows."""
    if lv.is_thin:
        return [lv.dm_name]
    if lv.segtype in ("linear", "striped") and not lv.is_cow_snapshot:
        return [dm_name(lv.vg, lv.name, "real"), lv.dm_name]
    return None


def check_name(name: str) -> str:
    """LV names: [A-Za-z0-9+_.-], not starting with '-' (lvm(8) 'VALID NAMES'); refuse anything else."""
    if not NAME_RE.match(name) or name in (".", "..") or len(name) > 127:
        raise Refused(f"invalid LV name {name!r}: use letters, digits and + _ . - only")
    return name


def _flag(v) -> bool:
    return str(v).strip() not in ("", "0", "-1")


def _int(v, default=0) -> int:
    v = str(v).strip()
    return int(v) if v and v.lstrip("-").isdigit() else default


def _float(v) -> float:
    try:
        return float(str(v).strip() or 0)
    except ValueError:
        return 0.0


def parse_lvs_json(text: str) -> list[LV]:
    """Parse ``lvs --reportformat json --units b --nosuffix --binary -o FIELDS`` output."""
    try:
        doc = json.loads(text)
        rows = [row for rep in doc["report"] for row in rep.get("lv", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise LvmError(f"cannot parse lvs JSON output: {e}") from None
    out = []
    for r in rows:
        thin_id = str(r.get("thin_id", "")).strip()
        out.append(LV(
            vg=r["vg_name"], name=r["lv_name"], path=r.get("lv_path", ""), dm_path=r.get("lv_dm_path", ""),
            attr=r.get("lv_attr", ""), size=_int(r.get("lv_size")), segtype=r.get("segtype", ""),
            origin=r.get("origin", "").strip("[]"), pool=r.get("pool_lv", "").strip("[]"),
            thin_id=int(thin_id) if thin_id.isdigit() else None, chunk_size=_int(r.get("chunk_size")),
            active=_flag(r.get("lv_active", "")), skip_activation=_flag(r.get("lv_skip_activation", "")),
            snapshot_invalid=_flag(r.get("lv_snapshot_invalid", "")), merging=_flag(r.get("lv_merging", "")),
            merge_failed=_flag(r.get("lv_merge_failed", "")), open=_flag(r.get("lv_device_open", "")),
            suspended=_flag(r.get("lv_suspended", "")), extent_size=_int(r.get("vg_extent_size")),
            origin_size=_int(r.get("origin_size")), uuid=r.get("lv_uuid", ""),
            tags=tuple(t for t in str(r.get("lv_tags", "")).split(",") if t), vg_free=_int(r.get("vg_free")),
            data_percent=_float(r.get("data_percent")), metadata_percent=_float(r.get("metadata_percent")),
            zero=_flag(r.get("zero", "")), lock_type=str(r.get("vg_lock_type", "")).strip()))
    return out


def _lvm(*args, check=True, timeout=TIMEOUT) -> Result:
    """Run one LVM command: in this process's lvm shell when it runs (rcopy.sys.lvm_shell), else as a
    process. Either way the Result is the same: exit code, report JSON on stdout, errors on stderr."""
    report = args[0] in ("lvs", "vgs")
    if not report:
        _Reports.changed()
    argv = ("lvm", args[0], "--config", LVM_CONFIG, *args[1:])
    try:
        text = lvm_shell.line(argv[1:])
        shell = lvm_shell.get() if text is not None else None
        # a command that changes something runs to its end: SIGTERM waits for it (rcopy.sys.interrupts)
        with contextlib.nullcontext() if report else interrupts.deferred():
            try:
                res = shell.run(argv, text, timeout) if shell else run(argv, timeout=timeout)
            except lvm_shell.ShellUnavailable as e:
                raise LvmError(f"{' '.join(argv)}: {e}") from None
        if check and not res.ok:
            raise LvmError(describe(res))
        return res
    finally:
        if not report:
            _Reports.changed()


class _Reports:
    """One ``lvs -a VG`` report per VG answers every question asked inside ``reports()``.

    Measured in the lab (issue 15): one sync of two volumes ran 48 ``lvs``, ~0.3 s each under TCG and
    50-300 ms on real hardware. Any LVM command that changes something (lvcreate, lvremove, lvchange,
    lvconvert, lvrename) drops every cached report, so a reader inside the block never sees a state
    older than rcopy's own last change. Outside ``reports()`` nothing is cached.
    """

    _mutex = threading.Lock()
    _depth = 0
    _vgs: dict[str, list[LV]] = {}

    @classmethod
    def changed(cls):
        with cls._mutex:
            cls._vgs = {}

    @classmethod
    def vg(cls, vg: str) -> list[LV] | None:
        with cls._mutex:
            if not cls._depth:
                return None
            if vg in cls._vgs:
                return cls._vgs[vg]
        rows = _report(vg, all_lvs=True)
        with cls._mutex:
            if cls._depth:
                cls._vgs[vg] = rows
        return rows


@contextlib.contextmanager
def reports():
    """Answer ``lvs`` from one report per VG for the duration of the block (a sync phase)."""
    with _Reports._mutex:
        _Reports._depth += 1
    try:
        yield
    finally:
        with _Reports._mutex:
            _Reports._depth -= 1
            if not _Reports._depth:
                _Reports._vgs = {}


def prime(*paths: str) -> None:
    """Read now, inside ``reports()``, the report of each VG holding one of ``paths`` (/dev/VG/LV),
    so a caller waiting on something else (the peer's agent starting) pays for it meanwhile."""
    for vg in dict.fromkeys(sp[0] for sp in map(_split_selector, paths) if sp and sp[1]):
        _Reports.vg(vg)


def _split_selector(sel: str) -> tuple[str, str] | None:
    """(VG, LV or '') for 'VG', 'VG/LV' or '/dev/VG/LV'; None for anything else (asked of LVM)."""
    parts = sel[5:].split("/") if sel.startswith("/dev/") else sel.split("/")
    if sel.startswith("/dev/") and (len(parts) != 2 or parts[0] in ("mapper", "disk")):
        return None
    if len(parts) == 1 and parts[0] and not sel.startswith("/"):
        return parts[0], ""
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    return None


def lvs(*selectors: str, all_lvs: bool = False) -> list[LV]:
    """Every LV matching the selectors (VG, VG/LV or /dev paths); [] when none exists."""
    split = [_split_selector(s) for s in selectors]
    if selectors and all(split):
        out: list[LV] = []
        for vg, name in split:
            rows = _Reports.vg(vg)
            if rows is None:
                break
            out += [lv for lv in rows if (lv.name == name if name else all_lvs or not lv.name.startswith("["))]
        else:
            return out
    return _report(*selectors, all_lvs=all_lvs)


def _report(*selectors: str, all_lvs: bool = False) -> list[LV]:
    argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "--binary",
            "-o", ",".join(FIELDS)]
    if all_lvs:
        argv.append("-a")
    res = _lvm(*argv, *selectors, check=False)
    if not res.ok:
        if _missing(res):
            return []
        raise LvmError(describe(res))
    return parse_lvs_json(res.stdout)


def _missing(res: Result) -> bool:
    err = res.stderr
    return ("not found" in err or "Failed to find logical volume" in err
            or "does not exist" in err or "Volume group" in err and "not found" in err)


def get(vg: str, name: str) -> LV | None:
    """The LV VG/NAME, or None."""
    rows = [lv for lv in lvs(f"{vg}/{name}") if lv.name == name]
    return rows[0] if rows else None


def require(vg: str, name: str) -> LV:
    lv = get(vg, name)
    if lv is None:
        raise LvNotFound(lv=f"{vg}/{name}")
    return lv


def by_path(path: str) -> LV:
    """The LV behind a device path (/dev/VG/LV or /dev/mapper/VG-LV); LvNotFound if it is not an LV."""
    rows = lvs(path)
    if len(rows) != 1:
        raise LvNotFound(lv=path)
    return rows[0]


def _same_snapshot(lv: LV, origin: str) -> None:
    if lv.origin != origin:
        raise AlreadyExists(f"{lv.full_name} exists but is not a snapshot of {lv.vg}/{origin}: "
                            f"remove it or choose another name")


def create_thin_snapshot(vg: str, origin: str, name: str, *, active: bool = True) -> LV:
    """Thin snapshot VG/NAME of VG/ORIGIN. Idempotent. With ``active`` (the default) activation skip
    is cleared and it is activated; otherwise it stays inactive with activation skip set, LVM's
    default, which the group cut needs (rcopy.snapshot.thin re-takes it at the cut instant)."""
    (lv,) = create_thin_snapshots([(vg, origin, name)])
    return activate(lv) if active else lv


def create_thin_snapshots(pairs: list[tuple[str, str, str]]) -> list[LV]:
    """Inactive thin snapshots (activation skip set) of each (VG, ORIGIN, NAME), as the group cut
    prepares them (rcopy.snapshot.thin); idempotent. LVM makes one LV per ``lvcreate``, but nothing is
    read between them: every existing one is looked up before the first, and all are read back after
    the last from one report per VG (one ``lvs`` after each cost ~0.25 s a volume in the lab)."""
    missing = [(vg, origin, name) for vg, origin, name in pairs if get(vg, check_name(name)) is None]
    for vg, origin, name in missing:
        _lvm("lvcreate", "-qq", "-s", "-ky", "-n", name, f"{vg}/{origin}")
    made = []
    for vg, origin, name in pairs:
        lv = require(vg, name)
        _same_snapshot(lv, origin)
        made.append(lv)
    return made


def snapshot_now(vg: str, origin: str, name: str, *, size: int = 0) -> str:
    """One ``lvcreate`` of an active snapshot VG/NAME of an origin nobody writes, LVM suspending the
    origin itself for that moment: thin when ``size`` is 0, else classic with a COW store of ``size``
    bytes. Returns its path without reading a report back (lvcreate fails if it did not make it)."""
    check_name(name)
    if size:
        _lvm("lvcreate", "-qq", "-s", "-L", f"{-(-int(size) // 1024)}k", "-n", name, f"{vg}/{origin}")
    else:
        _lvm("lvcreate", "-qq", "-s", "-kn", "-n", name, f"{vg}/{origin}")
    return lv_path(vg, name)


def create_cow_snapshot(vg: str, origin: str, name: str, size: int) -> LV:
    """Classic dm-snapshot VG/NAME of VG/ORIGIN with a COW store of ``size`` bytes. Idempotent."""
    lv = get(vg, check_name(name))
    if lv is None:
        snapshot_now(vg, origin, name, size=size)
        lv = require(vg, name)
    _same_snapshot(lv, origin)
    return lv


@dataclasses.dataclass(frozen=True)
class VG:
    """One row of ``vgs``: what creating an LV in it needs to know."""

    name: str
    free: int
    extent_size: int


def vg(name: str) -> VG | None:
    """The volume group NAME, or None (``vgs``: an empty VG has no row in ``lvs``)."""
    res = _lvm("vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", "vg_name,vg_free,vg_extent_size", name, check=False)
    if not res.ok:
        if _missing(res):
            return None
        raise LvmError(describe(res))
    try:
        rows = json.loads(res.stdout)["report"][0]["vg"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LvmError(f"unreadable vgs report: {e}") from None
    return next((VG(r["vg_name"], _int(r.get("vg_free")), _int(r.get("vg_extent_size"))) for r in rows
                 if r.get("vg_name") == name), None)


def create_volume(vg_name: str, name: str, size: int, *, pool: str = "") -> LV:
    """A new LV VG/NAME of exactly ``size`` bytes: thick (zeroed start, signatures wiped) or, with
    ``pool``, thin in VG/POOL (reads as zeros). Refuses a name that exists: never reuses an LV."""
    check_name(name)
    if get(vg_name, name) is not None:
        raise AlreadyExists(f"{vg_name}/{name} already exists: pick another name")
    if pool:
        _lvm("lvcreate", "-qq", "-y", "-V", f"{size}b", "-T", f"{vg_name}/{pool}", "-n", name)
    else:
        _lvm("lvcreate", "-qq", "-y", "-Wy", "-Zy", "-L", f"{size}b", "-n", name, vg_name)
    return require(vg_name, name)


def activate(lv: LV) -> LV:
    """Clear activation skip and activate (thin snapshots default to skip); no-op when already so."""
    if not lv.skip_activation and lv.active:
        return lv
    activate_all([lv])
    return require(lv.vg, lv.name)


def activate_all(lvs_: list[LV]) -> list[str]:
    """Clear activation skip and activate several LVs with ONE ``lvchange`` (two when some have no
    skip flag to clear), none for those already so; returns their paths. The group cut's thin
    snapshots: one command for the group, not one and a report read back per volume."""
    todo = [lv for lv in lvs_ if lv.skip_activation or not lv.active]
    for skip in (True, False):
        batch = [lv.full_name for lv in todo if lv.skip_activation == skip]
        if batch:
            _lvm("lvchange", *(("-kn",) if skip else ()), "-ay", *batch)
    return [lv_path(lv.vg, lv.name) for lv in lvs_]


def lv_path(vg: str, name: str) -> str:
    """The /dev/VG/LV path of an active LV (LVM's own naming, as lvs reports it)."""
    return f"/dev/{vg}/{name}"


def deactivate(lv: LV) -> LV:
    if lv.active:
        _lvm("lvchange", "-an", lv.full_name)
        return require(lv.vg, lv.name)
    return lv


def remove(vg: str, name: str) -> bool:
    """Remove VG/NAME; True if it was removed, False if it was already gone."""
    if get(vg, name) is None:
        return False
    res = _lvm("lvremove", "-qq", "-f", f"{vg}/{name}", check=False)
    if not res.ok:
        if get(vg, name) is None:
            return False
        raise LvmError(describe(res))
    return True


def remove_all(lvs_: list[tuple[str, str]]) -> int:
    """Remove every (VG, NAME) that exists with ONE lvremove; returns how many were removed."""
    present = [f"{vg}/{name}" for vg, name in dict.fromkeys(lvs_) if get(vg, name) is not None]
    if not present:
        return 0
    res = _lvm("lvremove", "-qq", "-f", *present, check=False)
    if not res.ok:
        left = [p for p in present if get(*p.split("/", 1)) is not None]
        if left:
            raise LvmError(describe(res))
    return len(present)


def set_access(lvs_: list[LV], *, writable: bool, drop_tags: tuple[str, ...] = (), add_tag: str = "") -> list[LV]:
    """Permission (and optionally a tag swap) of several LVs, with ONE lvchange for those whose
    permission changes (and one for those needing only the tags); LVs already so are skipped.
    Returns the LVs as they now are (permission and tags), for a caller that changes them again
    later without reading a report in between."""
    want = "w" if writable else "r"
    perm, tags_only = [], []
    for lv in lvs_:
        retag = bool(add_tag and add_tag not in lv.tags) or any(t in lv.tags for t in drop_tags)
        if ("w" if lv.attr[1:2] == "w" else "r") != want:
            perm.append(lv)
        elif retag:
            tags_only.append(lv)
    for batch, flags in ((perm, ["-p", "rw" if writable else "r"]), (tags_only, [])):
        if not batch:
            continue
        argv = ["lvchange", "-qq", *flags]
        for t in sorted({t for lv in batch for t in lv.tags if t in drop_tags}):
            argv += ["--deltag", t]
        if add_tag:
            argv += ["--addtag", add_tag]
        _lvm(*argv, *[lv.full_name for lv in batch])
    perm_char = "w" if writable else "r"
    return [dataclasses.replace(lv, attr=lv.attr[:1] + perm_char + lv.attr[2:],
                                tags=tuple(t for t in lv.tags if t not in drop_tags)
                                + ((add_tag,) if add_tag and add_tag not in lv.tags else ()))
            for lv in lvs_]


def rename(vg: str, old: str, new: str) -> None:
    """Rename VG/OLD to NEW; quiet when OLD is gone and NEW exists (already renamed)."""
    check_name(new)
    if get(vg, old) is None and get(vg, new) is not None:
        return
    _lvm("lvrename", "-qq", vg, old, new)


def merge(vg: str, name: str) -> None:
    """Start merging snapshot VG/NAME into its origin (``lvconvert --merge``)."""
    lv = get(vg, name)
    if lv is None or lv.merging:
        return
    _lvm("lvconvert", "-qq", "--merge", f"{vg}/{name}")


def wait_merged(vg: str, name: str, *, timeout: float = 3600.0, poll: float = 0.5) -> None:
    """Block until the snapshot VG/NAME has merged (and so disappeared); raise LvmError on failure."""
    def merged() -> bool | None:
        _Reports.changed()          # a merge moves on its own: never answer from a cached report
        lv = get(vg, name)
        if lv is None:
            return True
        if lv.merge_failed:
            raise LvmError(f"merge of {vg}/{name} into its origin failed: see 'lvs -a {vg}' and the kernel log")
        if not lv.merging:
            raise LvmError(f"{vg}/{name} still exists but is not merging: the merge was deferred "
                           f"(is the origin open?); close the origin and retry")
        return None

    # lvconvert returns at once; polling 'lvs' is how LVM's own lvpoll watches it.
    if not until(merged, timeout, poll):
        raise LvmError(f"merge of {vg}/{name} did not finish within {timeout:.0f} s")
