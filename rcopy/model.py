"""rcopy's vocabulary as plain data: systems, targets, links, groups, volume pairs, sync points.

Names follow rcopy/DESIGN.md §1 and 3PAR's ``showrcopy`` (roles primary / secondary / primary-rev /
secondary-rev; group states new, starting, started, stopped, failsafe; volume states new, syncing,
synced, not-synced, stale, failed). Values are frozen dataclasses: rcopy.state persists them, the engine
computes new ones with ``dataclasses.replace``; nothing here touches the system.
"""
from __future__ import annotations

import dataclasses
import enum
import re

from rcopy.errors import UsageError


class Role(str, enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    PRIMARY_REV = "primary-rev"
    SECONDARY_REV = "secondary-rev"


class GroupState(str, enum.Enum):
    NEW = "new"
    STARTING = "starting"
    STARTED = "started"
    STOPPED = "stopped"
    FAILSAFE = "failsafe"


class VolumeState(str, enum.Enum):
    NEW = "new"
    SYNCING = "syncing"
    SYNCED = "synced"
    NOT_SYNCED = "not-synced"
    STALE = "stale"
    FAILED = "failed"


class LinkState(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


# over_per_alert is on unless no_over_per_alert is given (3PAR's default); parse_policies adds it.
POLICIES = frozenset({"auto_recover", "over_per_alert", "no_over_per_alert"})
# Why a group stopped, typed for policy: auto_recover restarts only "link" (the target or its links were
# lost) and "interrupted" (rcopy itself died mid-sync and a reconcile rolled it back); "device", "space",
# "state", "auth" (a host key or the sync's certificate refused: rcopy.errors.AuthFailed) and "failed"
# wait for the administrator, as 3PAR does; "admin" is an administrator's stop; "failover" fences a
# natural primary whose backup took over (only recover, run there, lifts it).
FAULTS = ("admin", "link", "interrupted", "device", "space", "state", "auth", "failed", "failover")
RECOVERABLE = frozenset({"link", "interrupted"})
MODE_PERIODIC = "periodic"

# Group and volume names become part of reserved snapshot names (rcopy.<group>.<volume>.<kind><gen>),
# so they may not contain the separator '.'; LVM allows [A-Za-z0-9+_.-] in LV names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{0,63}$")

MIN_PERIOD = 15                       # seconds; 3PAR's newer arrays go down to 15 s
MAX_PERIOD = 365 * 24 * 3600          # one year, as 3PAR
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(f"bad {kind} name {name!r}: use letters, digits, '_', '+', '-' (no '.'), "
                         "at most 64 characters, starting with a letter or digit")
    return name


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def check_link(address: str) -> str:
    """A link is a host name or an IP literal, nothing else: it goes into the agent's command line
    (``ssh root@{link}``), where a leading '-' or a space would become an option (ProxyCommand...)."""
    import ipaddress
    a = address or ""
    try:
        ipaddress.ip_address(a)
        return a
    except ValueError:
        pass
    if len(a) <= 253 and all(_HOST_LABEL.match(label) for label in a.rstrip(".").split(".")):
        return a
    raise UsageError(f"bad link address {address!r}: give a host name (letters, digits, '-', '.') or an "
                     "IPv4/IPv6 address")


def parse_period(text: str) -> int:
    """'15s', '5m', '2h', '1d' (or plain seconds) -> seconds, within 15 s .. 1 year."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text or "")
    if not m:
        raise UsageError(f"bad period {text!r}: give a number with a unit s, m, h or d, e.g. 5m")
    seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not MIN_PERIOD <= seconds <= MAX_PERIOD:
        raise UsageError(f"bad period {text!r}: must be between 15s and 365d")
    return seconds


def format_period(seconds: int | None) -> str:
    if not seconds:
        return "-"
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_policies(text: str | None) -> frozenset[str]:
    names = frozenset(p.strip() for p in (text or "").split(",") if p.strip())
    bad = names - POLICIES
    if bad:
        raise UsageError(f"unknown policy {', '.join(sorted(bad))}: known are {', '.join(sorted(POLICIES))}")
    if {"over_per_alert", "no_over_per_alert"} <= names:
        raise UsageError("policies over_per_alert and no_over_per_alert exclude each other")
    if "no_over_per_alert" not in names:
        names |= {"over_per_alert"}                # on by default, as on 3PAR
    return names


@dataclasses.dataclass(frozen=True)
class System:
    """This host as rcopy sees it."""

    name: str
    schema_version: int


@dataclasses.dataclass(frozen=True)
class Link:
    target: str
    address: str
    state: LinkState = LinkState.UNKNOWN
    since: float = 0.0             # when it was last found in this state (0: never probed)


LINK_TIMEOUT = 25          # s of silence that end a link (3PAR's heartbeat timeout)
TARGET_TIMEOUT = 200       # s more, every link silent, before the target has failed (3PAR's)
SSH_CONTROL_DIR = "/run/rcopy"   # ssh's shared connections (Target.ssh_persist), root's only
HEARTBEAT = 5              # s between the primary's pings, and ssh's ServerAliveInterval


def check_timeout(what: str, seconds: int, low: int) -> int:
    """A timeout in whole seconds, from ``low`` to one day."""
    if not low <= seconds <= 86400:
        raise UsageError(f"{what} {seconds} s is out of range: give {low} to 86400 seconds")
    return seconds


@dataclasses.dataclass(frozen=True)
class Target:
    """A peer system: its links, the command that runs its agent (``{link}`` is substituted; also
    ``{alive_count}``: ssh's ServerAliveCountMax for the link timeout, and ``{ssh_share}``: ssh's
    connection-sharing options when ``ssh_persist`` is set), and its two timeouts: a link is down
    after ``link_timeout`` s without an answer, the target failed ``target_timeout`` s after its last
    link went down (the agent rolls an open sync back after that long without a request).
    ``ssh_persist``: seconds one ssh connection per link stays open after its last session (0: off),
    so a sync within that time skips the ssh login (1.5 of a quiet sync's ~6 s in the lab); a link
    that dies in between is then noticed after the link timeout instead of ssh's 10 s ConnectTimeout."""

    name: str
    links: tuple[str, ...]
    agent: str | None = None
    link_timeout: int = LINK_TIMEOUT
    target_timeout: int = TARGET_TIMEOUT
    ssh_persist: int = 0

    # ServerAlive*: ssh gives up link_timeout s after the link goes silent (3PAR's link heartbeat timeout).
    # StrictHostKeyChecking=yes whatever ~/.ssh/config says: an unknown or changed host key is refused
    # (rcopy.transport.peer.HostKeyUnknown / HostKeyChanged name the fix), never accepted on first use
    DEFAULT_AGENT = ("ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 "
                     f"-o ServerAliveInterval={HEARTBEAT} -o ServerAliveCountMax={{alive_count}} {{ssh_share}}root@{{link}} "
                     "rcopy agent")

    @property
    def agent_template(self) -> str:
        return self.agent or self.DEFAULT_AGENT

    def agent_command(self, link: str) -> str:
        alive = str(max(1, -(-self.link_timeout // HEARTBEAT)))
        share = (f"-o ControlMaster=auto -o ControlPath={SSH_CONTROL_DIR}/ssh-%C "
                 f"-o ControlPersist={self.ssh_persist} ") if self.ssh_persist else ""
        return (self.agent_template.replace("{link}", check_link(link)).replace("{alive_count}", alive)
                .replace("{ssh_share}", share))


@dataclasses.dataclass(frozen=True)
class SyncPoint:
    """Sync point *generation* of a group; ``sync_id`` is random so two histories never match by chance."""

    group: str
    generation: int
    sync_id: str
    committed: bool = False
    started: float = 0.0
    ended: float = 0.0
    cut: float = 0.0               # when the primary's cut was taken (0: not recorded here)

    def as_dict(self) -> dict:
        return {"generation": self.generation, "id": self.sync_id, "committed": self.committed,
                "started": self.started, "ended": self.ended, "cut": self.cut}


ALERT_KINDS = ("over_period", "link_down", "target_failed", "stale", "space", "device")


@dataclasses.dataclass(frozen=True)
class Alert:
    """A condition an administrator should know about, from when it started until it ends (3PAR's alerts):
    ``kind`` one of ALERT_KINDS, ``object`` what it is about (a group, ``group/volume``, a target,
    ``target/address``), ``group`` the group it concerns ("" for targets and links)."""

    kind: str
    object: str
    group: str
    message: str
    since: float

    def as_dict(self) -> dict:
        return {"kind": self.kind, "object": self.object, "group": self.group, "message": self.message,
                "since": self.since}


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    target: str
    role: Role = Role.PRIMARY
    mode: str = MODE_PERIODIC
    period: int | None = None
    policies: frozenset[str] = frozenset()
    state: GroupState = GroupState.NEW
    reason: str = ""
    generation: int = 0            # last committed sync point (0: none yet)
    sync_id: str = ""              # its identity
    pending_generation: int = 0    # sync point in flight (0: none)
    pending_id: str = ""
    last_sync_start: float = 0.0
    last_sync_end: float = 0.0
    alert: str = ""                # unused since state schema 4 (alerts live in the alerts table)
    fault: str = ""                # why it stopped, as policy sees it: one of FAULTS ("" when running)
    failover_point: int = 0        # the sync point this side failed over at: its F snapshots are the
                                   # base of the next sync (rcopy.engine.roles), 0: none
    tidy: int = 0                  # backup: the committed sync point whose R snapshots and mark are still
                                   # to do (rcopy.app.agent: the commit answers first), 0: none

    @property
    def sends(self) -> bool:
        """This side is the source of the data (primary or primary-rev)."""
        return self.role in (Role.PRIMARY, Role.PRIMARY_REV)

    @property
    def syncing(self) -> bool:
        return self.pending_generation != 0


@dataclasses.dataclass(frozen=True)
class VolumePair:
    """A local volume and its secondary. On the backup ``local`` is the secondary and ``remote`` the primary."""

    group: str
    name: str                      # the volume's name inside reserved snapshot names
    local: str                     # device (or file) path on this system
    remote: str                    # device path on the peer
    size: int
    state: VolumeState = VolumeState.NEW
    bytes_done: int = 0            # progress of the sync in flight
    bytes_total: int = 0
    bytes_sent: int = 0            # payload of the last completed sync
    last_sync: float = 0.0
    full_reason: str = ""          # why the last (or running) sync was full, "" for a delta
    backend: str = ""              # snapshot back-end chosen at admit: thin, cow or file
    device_id: str = ""            # the local device's stable identity (lv:UUID, file:DEV:INODE)

    @property
    def percent(self) -> int:
        return int(100 * self.bytes_done / self.bytes_total) if self.bytes_total else 0
