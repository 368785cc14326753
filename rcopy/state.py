"""Durable state of one rcopy system: one SQLite database and the per-group lock files.

Where: ``--state-dir`` (exported as ``RCOPY_STATE_DIR`` by the CLI) or ``/var/lib/rcopy``; the directory
is mode 0700, every file in it 0600. The database runs in WAL mode with ``synchronous=FULL``, so a
committed transaction survives a host crash and a killed writer leaves the previous committed state.
Each sync-point commit is ONE transaction (group generation, sync-point row, volume states together),
which is what makes the two-phase commit of rcopy/DESIGN.md §4 recoverable (rcopy/engine/DESIGN.md).

Schema (version 8, in ``meta.schema_version``; ``_MIGRATIONS[n]`` upgrades n-1 -> n):

``meta(key PRIMARY KEY, value)``
    ``schema_version``, ``system`` (this system's name; default the host name or $RCOPY_SYSTEM_NAME).
``targets(name PRIMARY KEY, agent)``
    a peer system and its agent command (NULL: the default ssh command); ``link_timeout``,
    ``target_timeout`` (v6) in seconds (rcopy.model.Target).
``links(target, address, state, PRIMARY KEY(target, address))``
    link addresses of a target, in the order given; state up / down / unknown.
``groups(name PRIMARY KEY, target, role, mode, period, policies, state, reason, generation, sync_id,
pending_generation, pending_id, last_sync_start, last_sync_end, alert)``
    one row per group (primary or secondary side); ``generation``/``sync_id`` name the last committed
    sync point, ``pending_*`` the one in flight (0 / '' when none). Policies are comma separated.
``volumes(grp, name, local UNIQUE, remote, size, state, bytes_done, bytes_total, bytes_sent, last_sync,
full_reason, backend, device_id, PRIMARY KEY(grp, name))``
    volume pairs; ``local`` is unique across groups (a volume is in one group only). ``backend`` (thin,
    cow, file) and ``device_id`` (``lv:UUID`` or ``file:DEV:INODE``) are decided once at admit (v2).
``groups.fault`` (v2)
    why the group stopped, typed for policy (rcopy.model.FAULTS); '' while it runs.
``groups.last_report`` (v2)
    JSON of the last sync's report: seconds per phase, external commands on each side, bytes, the
    executed plan (``rcopy status --json`` shows it as ``last_sync``).
``groups.failover_point`` (v3)
    the sync point at which this side failed over (its F snapshots are the next sync's base), 0: none.
``sync_points(grp, generation, sync_id, committed, started, ended, PRIMARY KEY(grp, generation))``
    the committed sync point of each group and the one in flight, with their identities.
``sync_points.cut`` (v4)
    when the primary's cut of that sync point was taken (Unix seconds; 0: not recorded, e.g. on the
    backup): the lag (the recovery point right now) is measured from the committed point's cut.
``alerts(kind, object, grp, message, since, PRIMARY KEY(kind, object))`` (v4)
    the alerts raised and not yet cleared (rcopy.app.alerts); ``groups.alert`` (v1) is no longer
    written: v4 moved its text here.
``links.since`` (v5)
    when the link was last found in its present state (Unix seconds; 0: never probed).
``targets.ssh_persist`` (v7)
    share one ssh connection to the target's agent across runs (``rcopy target set --ssh-persist``).
``groups.tidy`` (v8)
    on a backup: the committed sync point whose tidy-up (delete R of the point before it, mark the
    secondaries read-only with this point) is not done yet, 0: none. Set in the commit's transaction,
    cleared once done, so an agent that dies in between leaves the next one the exact work, and an
    agent start with nothing to tidy reads no LVM report. The upgrade sets it on every secondary group
    once (the older agents swept R snapshots at each start).

Locks: ``locks/<group>.lock`` held with ``flock(LOCK_EX|LOCK_NB)`` for the duration of a sync (on the
primary by the syncing process, on the backup by the agent serving it); the kernel drops it when the
holder dies, so a crash never leaves a stale lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from typing import Iterator

from rcopy import poll
from rcopy.errors import AlreadyExists, Busy, NotFound, PermissionDenied, Refused, StateError
from rcopy.model import (LINK_TIMEOUT, TARGET_TIMEOUT, Alert, Group, GroupState, Link, LinkState, Role, SyncPoint,
                         System, Target, VolumePair, VolumeState, check_name)

DEFAULT_DIR = "/var/lib/rcopy"
SCHEMA_VERSION = 8

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE targets (name TEXT PRIMARY KEY, agent TEXT);
CREATE TABLE links (target TEXT NOT NULL REFERENCES targets(name) ON DELETE CASCADE, address TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'unknown', seq INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (target, address));
CREATE TABLE groups (name TEXT PRIMARY KEY, target TEXT NOT NULL, role TEXT NOT NULL, mode TEXT NOT NULL,
    period INTEGER, policies TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 0, sync_id TEXT NOT NULL DEFAULT '',
    pending_generation INTEGER NOT NULL DEFAULT 0, pending_id TEXT NOT NULL DEFAULT '',
    last_sync_start REAL NOT NULL DEFAULT 0, last_sync_end REAL NOT NULL DEFAULT 0,
    alert TEXT NOT NULL DEFAULT '');
CREATE TABLE volumes (grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE, name TEXT NOT NULL,
    local TEXT NOT NULL UNIQUE, remote TEXT NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0, last_sync REAL NOT NULL DEFAULT 0,
    full_reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (grp, name));
CREATE TABLE sync_points (grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    generation INTEGER NOT NULL, sync_id TEXT NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL DEFAULT 0, ended REAL NOT NULL DEFAULT 0, PRIMARY KEY (grp, generation));
"""

# schema version n -> SQL that upgrades a version n-1 database; run in one transaction with the version bump.
_SCHEMA_V2 = """
ALTER TABLE volumes ADD COLUMN backend TEXT NOT NULL DEFAULT '';
ALTER TABLE volumes ADD COLUMN device_id TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN last_report TEXT NOT NULL DEFAULT '{}';
ALTER TABLE groups ADD COLUMN fault TEXT NOT NULL DEFAULT ''
"""
_SCHEMA_V3 = """
ALTER TABLE groups ADD COLUMN failover_point INTEGER NOT NULL DEFAULT 0
"""
_SCHEMA_V4 = """
ALTER TABLE sync_points ADD COLUMN cut REAL NOT NULL DEFAULT 0;
CREATE TABLE alerts (kind TEXT NOT NULL, object TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '', message TEXT NOT NULL,
    since REAL NOT NULL, PRIMARY KEY (kind, object));
INSERT INTO alerts SELECT CASE WHEN alert LIKE 'thin pool%' THEN 'space' ELSE 'over_period' END, name, name, alert,
    CASE WHEN last_sync_end > 0 THEN last_sync_end ELSE strftime('%s', 'now') END FROM groups WHERE alert <> '';
UPDATE groups SET alert = ''
"""
_SCHEMA_V5 = """
ALTER TABLE links ADD COLUMN since REAL NOT NULL DEFAULT 0
"""
_SCHEMA_V6 = f"""
ALTER TABLE targets ADD COLUMN link_timeout INTEGER NOT NULL DEFAULT {LINK_TIMEOUT};
ALTER TABLE targets ADD COLUMN target_timeout INTEGER NOT NULL DEFAULT {TARGET_TIMEOUT}
"""
_SCHEMA_V7 = """
ALTER TABLE targets ADD COLUMN ssh_persist INTEGER NOT NULL DEFAULT 0
"""
_SCHEMA_V8 = """
ALTER TABLE groups ADD COLUMN tidy INTEGER NOT NULL DEFAULT 0;
UPDATE groups SET tidy=generation WHERE role IN ('secondary', 'secondary-rev') AND generation > 1
"""
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5,
                               6: _SCHEMA_V6, 7: _SCHEMA_V7, 8: _SCHEMA_V8}


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("RCOPY_STATE_DIR") or DEFAULT_DIR


def _row_to(cls, row: sqlite3.Row, **over):
    """Build a model dataclass from a row whose columns carry its field names (enums converted)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in over:
            kw[f.name] = over[f.name]
        elif f.name in row.keys():
            kw[f.name] = row[f.name]
    for name, enum_cls in (("role", Role), ("state", None)):
        if name in kw and isinstance(kw[name], str):
            enum_cls = enum_cls or {Group: GroupState, VolumePair: VolumeState, Link: LinkState}[cls]
            kw[name] = enum_cls(kw[name])
    if cls is Group:
        kw["policies"] = frozenset(p for p in (kw.get("policies") or "").split(",") if p)
    if cls is VolumePair:
        kw["group"] = row["grp"]
    return cls(**kw)


def _values(obj, columns: tuple[str, ...]) -> list:
    out = []
    for c in columns:
        v = getattr(obj, "group" if c == "grp" else c)
        if isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, frozenset):
            v = ",".join(sorted(v))
        out.append(v)
    return out


_GROUP_COLS = ("name", "target", "role", "mode", "period", "policies", "state", "reason", "generation", "sync_id",
               "pending_generation", "pending_id", "last_sync_start", "last_sync_end", "alert", "fault",
               "failover_point")           # not tidy: only commit_sync and tidied write it
_VOLUME_COLS = ("grp", "name", "local", "remote", "size", "state", "bytes_done", "bytes_total", "bytes_sent",
                "last_sync", "full_reason", "backend", "device_id")


class Store:
    """The one door to durable state. Thread safe (one connection, one lock): sync workers report progress."""

    def __init__(self, directory: str | None = None):
        self.dir = state_dir(directory)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
            os.makedirs(os.path.join(self.dir, "locks"), mode=0o700, exist_ok=True)
        except PermissionError:
            raise PermissionDenied(f"cannot create state directory {self.dir}: run as root or set --state-dir") from None
        self.path = os.path.join(self.dir, "rcopy.db")
        old = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StateError(f"cannot open state database {self.path}: {e}") from None
        finally:
            os.umask(old)
        self._db.row_factory = sqlite3.Row
        self._mutex = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            if os.path.isfile(p):
                os.chmod(p, 0o600)

    def close(self):
        with self._mutex:
            self._db.close()

    # -- transactions -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all or nothing, durable at COMMIT (synchronous=FULL)."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._mutex:
            return self._db.execute(sql, args).fetchall()

    def _migrate(self):
        with self.tx() as db:
            have = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            version = int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]) if have else 0
            if version > SCHEMA_VERSION:
                raise StateError(f"state in {self.dir} has schema {version}, newer than this rcopy ({SCHEMA_VERSION}): upgrade rcopy")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                # statement by statement: executescript() would COMMIT in the middle of this transaction
                for stmt in filter(str.strip, _MIGRATIONS[v].split(";")):
                    db.execute(stmt)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v),))
            if not db.execute("SELECT 1 FROM meta WHERE key='system'").fetchone():
                name = os.environ.get("RCOPY_SYSTEM_NAME") or socket.gethostname()
                db.execute("INSERT INTO meta VALUES ('system', ?)", (name,))

    def system(self) -> System:
        rows = dict((r["key"], r["value"]) for r in self._q("SELECT key, value FROM meta"))
        return System(rows["system"], int(rows["schema_version"]))

    # -- targets and links --------------------------------------------------------------------------
    def add_target(self, t: Target):
        with self.tx() as db:
            if db.execute("SELECT 1 FROM targets WHERE name=?", (t.name,)).fetchone():
                raise AlreadyExists(f"target {t.name} already exists: remove it first or pick another name")
            db.execute("INSERT INTO targets (name, agent, link_timeout, target_timeout, ssh_persist) "
                       "VALUES (?, ?, ?, ?, ?)", (t.name, t.agent, t.link_timeout, t.target_timeout, t.ssh_persist))
            for i, a in enumerate(t.links):
                db.execute("INSERT INTO links (target, address, seq) VALUES (?, ?, ?)", (t.name, a, i))

    def target(self, name: str) -> Target:
        row = self._q("SELECT * FROM targets WHERE name=?", (name,))
        if not row:
            raise NotFound(f"no target {name}: create it with 'rcopy target create {name} --link ADDR'")
        links = tuple(r["address"] for r in self._q("SELECT address FROM links WHERE target=? ORDER BY seq", (name,)))
        r = row[0]
        return Target(name, links, r["agent"], r["link_timeout"], r["target_timeout"], r["ssh_persist"])

    TARGET_OPTIONS = ("link_timeout", "target_timeout", "ssh_persist")

    def set_target_options(self, name: str, **changes: int) -> Target:
        """Change a target's timeouts or ssh sharing (``TARGET_OPTIONS``); the next session uses them."""
        unknown = set(changes) - set(self.TARGET_OPTIONS)
        if unknown:
            raise ValueError(f"not a target option: {', '.join(sorted(unknown))}")
        t = dataclasses.replace(self.target(name), **changes)
        with self.tx() as db:
            db.execute("UPDATE targets SET link_timeout=?, target_timeout=?, ssh_persist=? WHERE name=?",
                       (t.link_timeout, t.target_timeout, t.ssh_persist, name))
        return t

    def targets(self) -> list[Target]:
        return [self.target(r["name"]) for r in self._q("SELECT name FROM targets ORDER BY name")]

    def remove_target(self, name: str):
        self.target(name)
        with self.tx() as db:
            used = db.execute("SELECT name FROM groups WHERE target=? AND role IN ('primary','primary-rev')", (name,)).fetchall()
            if used:
                raise Refused(f"target {name} is used by group {used[0]['name']}: remove the group first")
            db.execute("DELETE FROM targets WHERE name=?", (name,))

    def links(self, target: str | None = None) -> list[Link]:
        sql, args = "SELECT * FROM links ORDER BY target, seq", ()
        if target:
            self.target(target)
            sql, args = "SELECT * FROM links WHERE target=? ORDER BY seq", (target,)
        return [_row_to(Link, r) for r in self._q(sql, args)]

    def add_link(self, target: str, address: str):
        self.target(target)
        with self.tx() as db:
            if db.execute("SELECT 1 FROM links WHERE target=? AND address=?", (target, address)).fetchone():
                raise AlreadyExists(f"target {target} already has link {address}")
            seq = db.execute("SELECT COALESCE(MAX(seq)+1, 0) FROM links WHERE target=?", (target,)).fetchone()[0]
            db.execute("INSERT INTO links (target, address, seq) VALUES (?, ?, ?)", (target, address, seq))

    def remove_link(self, target: str, address: str):
        t = self.target(target)
        if address not in t.links:
            raise NotFound(f"target {target} has no link {address}: see 'rcopy status links'")
        if len(t.links) == 1:
            raise Refused(f"{address} is the last link of target {target}: add another first or remove the target")
        with self.tx() as db:
            db.execute("DELETE FROM links WHERE target=? AND address=?", (target, address))

    def set_link_state(self, target: str, address: str, state: LinkState, now: float | None = None):
        """Record what a probe or a connect found; ``since`` moves only when the state changes."""
        now = time.time() if now is None else now
        with self.tx() as db:
            db.execute("UPDATE links SET since=CASE WHEN state<>? OR since=0 THEN ? ELSE since END, state=? "
                       "WHERE target=? AND address=?", (state.value, now, state.value, target, address))

    # -- groups and volumes -------------------------------------------------------------------------
    def add_group(self, g: Group):
        with self.tx() as db:
            if db.execute("SELECT 1 FROM groups WHERE name=?", (g.name,)).fetchone():
                raise AlreadyExists(f"group {g.name} already exists on {self.system().name}")
            db.execute(f"INSERT INTO groups ({','.join(_GROUP_COLS)}) VALUES ({','.join('?' * len(_GROUP_COLS))})",
                       _values(g, _GROUP_COLS))

    def group(self, name: str) -> Group:
        check_name("group", name)                 # a bad name is a usage error, not "not found"
        row = self._q("SELECT * FROM groups WHERE name=?", (name,))
        if not row:
            raise NotFound(f"no group {name} on {self.system().name}: see 'rcopy status groups'")
        return _row_to(Group, row[0])

    def has_group(self, name: str) -> bool:
        return bool(self._q("SELECT 1 FROM groups WHERE name=?", (name,)))

    def groups(self) -> list[Group]:
        return [_row_to(Group, r) for r in self._q("SELECT * FROM groups ORDER BY name")]

    def put_group(self, g: Group):
        with self.tx() as db:
            db.execute(f"UPDATE groups SET {','.join(c + '=?' for c in _GROUP_COLS)} WHERE name=?",
                       [*_values(g, _GROUP_COLS), g.name])

    def update_group(self, name: str, **changes) -> Group:
        g = dataclasses.replace(self.group(name), **changes)
        self.put_group(g)
        return g

    def remove_group(self, name: str):
        self.group(name)
        with self.tx() as db:
            db.execute("DELETE FROM groups WHERE name=?", (name,))

    def volumes(self, group: str) -> list[VolumePair]:
        return [_row_to(VolumePair, r) for r in self._q("SELECT * FROM volumes WHERE grp=? ORDER BY rowid", (group,))]

    def volume_by_local(self, local: str, device_id: str = "") -> VolumePair | None:
        """The volume pair whose local device is ``local`` (or has that stable identity)."""
        r = self._q("SELECT * FROM volumes WHERE local=? OR (device_id<>'' AND device_id=?)", (local, device_id))
        return _row_to(VolumePair, r[0]) if r else None

    def set_report(self, group: str, report: dict):
        with self.tx() as db:
            db.execute("UPDATE groups SET last_report=? WHERE name=?", (json.dumps(report, sort_keys=True), group))

    def report(self, group: str) -> dict:
        rows = self._q("SELECT last_report FROM groups WHERE name=?", (group,))
        return json.loads(rows[0]["last_report"] or "{}") if rows else {}

    def add_volume(self, v: VolumePair):
        with self.tx() as db:
            other = db.execute("SELECT grp, local FROM volumes WHERE local=? OR (device_id<>'' AND device_id=?)",
                               (v.local, v.device_id)).fetchone()
            if other:
                alias = "" if other["local"] == v.local else f" (as {other['local']}: the same device)"
                raise AlreadyExists(f"{v.local} is already in group {other['grp']}{alias}: dismiss it there first")
            if db.execute("SELECT 1 FROM volumes WHERE grp=? AND name=?", (v.group, v.name)).fetchone():
                raise AlreadyExists(f"group {v.group} already has a volume named {v.name}: rename the device")
            db.execute(f"INSERT INTO volumes ({','.join(_VOLUME_COLS)}) VALUES ({','.join('?' * len(_VOLUME_COLS))})",
                       _values(v, _VOLUME_COLS))

    def put_volume(self, v: VolumePair):
        with self.tx() as db:
            db.execute(f"UPDATE volumes SET {','.join(c + '=?' for c in _VOLUME_COLS)} WHERE grp=? AND name=?",
                       [*_values(v, _VOLUME_COLS), v.group, v.name])

    def remove_volume(self, group: str, name: str):
        with self.tx() as db:
            db.execute("DELETE FROM volumes WHERE grp=? AND name=?", (group, name))

    def progress(self, group: str, name: str, done: int, total: int):
        with self.tx() as db:
            db.execute("UPDATE volumes SET bytes_done=?, bytes_total=? WHERE grp=? AND name=?", (done, total, group, name))

    # -- sync points: the durable half of the two-phase commit ---------------------------------------
    def sync_points(self, group: str) -> list[SyncPoint]:
        return [SyncPoint(r["grp"], r["generation"], r["sync_id"], bool(r["committed"]), r["started"], r["ended"],
                          r["cut"]) for r in self._q("SELECT * FROM sync_points WHERE grp=? ORDER BY generation", (group,))]

    def mark_cut(self, group: str, generation: int, when: float | None = None):
        """Record when the cut of sync point ``generation`` (in flight) was taken."""
        with self.tx() as db:
            db.execute("UPDATE sync_points SET cut=? WHERE grp=? AND generation=?",
                       (time.time() if when is None else when, group, generation))

    def committed_point(self, group: str) -> SyncPoint | None:
        """The group's last committed sync point (None before the first)."""
        g = self.group(group)
        return next((p for p in self.sync_points(group) if p.committed and p.generation == g.generation), None)

    # -- alerts (rcopy.app.alerts): raised when a condition starts, cleared when it ends ----------------
    def raise_alert(self, kind: str, obj: str, message: str, group: str = "") -> bool:
        """Record the alert (kind, obj); True when it is new (the message of a standing one is refreshed,
        its ``since`` kept)."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM alerts WHERE kind=? AND object=?", (kind, obj)).fetchone():
                db.execute("UPDATE alerts SET message=?, grp=? WHERE kind=? AND object=?", (message, group, kind, obj))
                return False
            db.execute("INSERT INTO alerts (kind, object, grp, message, since) VALUES (?, ?, ?, ?, ?)",
                       (kind, obj, group, message, time.time()))
            return True

    def clear_alert(self, kind: str, obj: str) -> Alert | None:
        """Remove the alert; the one removed, or None when there was none."""
        with self.tx() as db:
            r = db.execute("SELECT * FROM alerts WHERE kind=? AND object=?", (kind, obj)).fetchone()
            if r is None:
                return None
            db.execute("DELETE FROM alerts WHERE kind=? AND object=?", (kind, obj))
            return Alert(r["kind"], r["object"], r["grp"], r["message"], r["since"])

    def alerts(self, group: str | None = None) -> list[Alert]:
        sql, args = "SELECT * FROM alerts ORDER BY since, kind, object", ()
        if group is not None:
            sql, args = "SELECT * FROM alerts WHERE grp=? ORDER BY since, kind, object", (group,)
        return [Alert(r["kind"], r["object"], r["grp"], r["message"], r["since"]) for r in self._q(sql, args)]

    def begin_sync(self, group: str, generation: int, sync_id: str, volumes: list[str] | None = None) -> Group:
        """Record sync point ``generation`` as in flight and its volumes as syncing (one transaction)."""
        now = time.time()
        with self.tx() as db:
            g = self.group(group)
            if g.pending_generation:
                raise Busy(f"group {group} already has sync point {g.pending_generation} in flight")
            db.execute("INSERT OR REPLACE INTO sync_points (grp, generation, sync_id, committed, started, ended) "
                       "VALUES (?, ?, ?, 0, ?, 0)", (group, generation, sync_id, now))
            db.execute("UPDATE groups SET pending_generation=?, pending_id=?, last_sync_start=? WHERE name=?",
                       (generation, sync_id, now, group))
            names = volumes if volumes is not None else [v.name for v in self.volumes(group)]
            for n in names:
                db.execute("UPDATE volumes SET state='syncing', bytes_done=0, bytes_total=0 WHERE grp=? AND name=?", (group, n))
        return self.group(group)

    def commit_sync(self, group: str, generation: int, sync_id: str, stats: dict[str, tuple[int, str]] | None = None,
                    *, state: GroupState = GroupState.STARTED, reason: str = "", fault: str = "",
                    tidy: bool = False) -> Group:
        """Make ``generation`` the group's sync point: ONE transaction (rcopy/DESIGN.md §4). Idempotent.

        ``stats`` maps volume name -> (bytes sent, full-sync reason) for the volumes that were synced;
        ``state``/``reason`` are the group's after the commit (rcopy.engine.states, event sync-done).
        ``tidy`` (a backup) records in the same transaction that the point's tidy-up is still to do.
        """
        now = time.time()
        with self.tx() as db:
            g = self.group(group)
            if g.generation == generation and g.sync_id == sync_id:
                return g
            if g.pending_generation != generation or g.pending_id != sync_id:
                raise StateError(f"group {group}: cannot commit sync point {generation} ({sync_id}): "
                                 f"in flight is {g.pending_generation} ({g.pending_id or '-'})")
            db.execute("UPDATE sync_points SET committed=1, ended=? WHERE grp=? AND generation=?", (now, group, generation))
            db.execute("DELETE FROM sync_points WHERE grp=? AND generation<>?", (group, generation))
            db.execute("UPDATE groups SET generation=?, sync_id=?, pending_generation=0, pending_id='', "
                       "last_sync_end=?, state=?, reason=?, fault=?, tidy=? WHERE name=?",
                       (generation, sync_id, now, state.value, reason, fault, generation if tidy else 0, group))
            for name, (sent, why) in (stats or {}).items():
                db.execute("UPDATE volumes SET state='synced', bytes_sent=?, full_reason=?, last_sync=?, "
                           "bytes_done=bytes_total WHERE grp=? AND name=?", (sent, why, now, group, name))
            db.execute("UPDATE volumes SET state='synced', last_sync=? WHERE grp=? AND state='syncing'", (now, group))
        return self.group(group)

    def tidied(self, group: str, generation: int):
        """The tidy-up of sync point ``generation`` is done (a later commit's own is left alone)."""
        with self.tx() as db:
            db.execute("UPDATE groups SET tidy=0 WHERE name=? AND tidy=?", (group, generation))

    def confirm_sync(self, group: str, generation: int, sync_id: str, *, when: float, started: float,
                     state: GroupState = GroupState.STARTED, reason: str = "", fault: str = "") -> Group:
        """Sync point ``generation`` stands for the group as of ``when``: nothing was written since its
        cut (rcopy.engine.plan.Confirm). Its cut time moves to ``when`` (the lag counts from there) and
        the volumes count as synced now, with nothing sent. ONE transaction; no new sync point."""
        now = time.time()
        with self.tx() as db:
            g = self.group(group)
            if (g.generation, g.sync_id) != (generation, sync_id) or g.pending_generation:
                raise StateError(f"group {group}: cannot confirm sync point {generation} ({sync_id}): it holds "
                                 f"{g.generation} ({g.sync_id or '-'}), in flight {g.pending_generation or 'none'}")
            db.execute("UPDATE sync_points SET cut=?, ended=? WHERE grp=? AND generation=?", (when, now, group, generation))
            db.execute("UPDATE groups SET last_sync_start=?, last_sync_end=?, state=?, reason=?, fault=? WHERE name=?",
                       (started, now, state.value, reason, fault, group))
            db.execute("UPDATE volumes SET bytes_sent=0, full_reason='', last_sync=?, bytes_done=0, bytes_total=0 "
                       "WHERE grp=? AND state='synced'", (now, group))
        return self.group(group)

    def abort_sync(self, group: str, reason: str, *, state: GroupState | None = GroupState.STOPPED,
                   fault: str = "failed", marks: dict[str, VolumeState] | None = None) -> Group:
        """Forget the sync point in flight; volumes return to the last committed point (or not-synced).
        ``state`` is the group's afterwards (rcopy.engine.states, event sync-failed); None keeps it."""
        with self.tx() as db:
            g = self.group(group)
            if g.pending_generation:
                db.execute("DELETE FROM sync_points WHERE grp=? AND generation=? AND committed=0",
                           (group, g.pending_generation))
            db.execute("UPDATE groups SET pending_generation=0, pending_id='' WHERE name=?", (group,))
            if state is not None:
                db.execute("UPDATE groups SET state=?, reason=?, fault=? WHERE name=?",
                           (state.value, reason, fault, group))
            db.execute("UPDATE volumes SET state=CASE WHEN last_sync>0 THEN 'synced' ELSE 'not-synced' END, "
                       "bytes_done=0 WHERE grp=? AND state='syncing'", (group,))
            for name, vstate in (marks or {}).items():
                db.execute("UPDATE volumes SET state=? WHERE grp=? AND name=?", (vstate.value, group, name))
        return self.group(group)

    # -- locks --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, group: str, what: str = "a sync", *, wait: float = 0.0) -> Iterator[None]:
        """Hold the group's lock or raise Busy: at once by default (a second sync is refused, §2.3), or
        after ``wait`` seconds of a holder not finishing (a sync aborting because the peer turned)."""
        fd = self.wait_lock(group, wait)
        if fd is None:
            raise Busy(f"group {group} is busy on {self.system().name} (pid {self.lock_holder(group)}, "
                       f"{what} or another operation is running): retry when it has finished")
        try:
            yield
        finally:
            os.close(fd)

    def try_lock(self, group: str) -> int | None:
        """The open, flock'ed lock file descriptor, or None when another process holds it. The name
        is checked before it becomes a path (``../x`` must never create a file outside the state)."""
        check_name("group", group)
        path = os.path.join(self.dir, "locks", f"{group}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)                       # the holder's pid, for diagnostics and takeover
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def wait_lock(self, group: str, seconds: float, poll_s: float = 0.2) -> int | None:
        """``try_lock``, retried for up to ``seconds`` while another process finishes."""
        return poll.until(lambda: self.try_lock(group), seconds, poll_s)

    def held(self, group: str) -> bool:
        """Does some process hold the group's lock right now (a sync or an operation really runs)? A
        sync recorded in flight with no holder is a crash left behind. Read from /proc/locks, so looking
        never takes the lock (a ``watch rcopy status`` must not make a starting sync Busy); only where
        that file cannot answer is the lock taken for an instant."""
        check_name("group", group)
        try:
            st = os.stat(os.path.join(self.dir, "locks", f"{group}.lock"))
        except FileNotFoundError:
            return False
        try:
            with open(PROC_LOCKS) as f:
                seen = flock_listed(f.read(), st.st_ino, os.major(st.st_dev), os.minor(st.st_dev))
        except OSError:
            seen = None
        if seen is not None:
            return seen
        fd = self.try_lock(group)
        if fd is None:
            return True
        os.close(fd)
        return False

    def lock_holder(self, group: str) -> int | None:
        """The pid written by the process that holds (or last held) the group's lock."""
        try:
            with open(os.path.join(self.dir, "locks", f"{group}.lock")) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


PROC_LOCKS = "/proc/locks"


def flock_listed(text: str, inode: int, major: int, minor: int) -> bool | None:
    """Is a flock on this inode held, per /proc/locks (``1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF``,
    hexadecimal device numbers; ``->`` lines are waiters)? None when only the inode matches: the
    kernel lists the superblock's device, which btrfs subvolumes report differently from stat."""
    loose = False
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            maj, mnr, ino = fields[5].split(":")
            if int(ino) != inode:
                continue
            if (int(maj, 16), int(mnr, 16)) == (major, minor):
                return True
        except ValueError:
            continue
        loose = True
    return None if loose else False
