"""What an admin's monitoring reads: the figures of each group (lag, last sync's duration and bytes)
and the same as Prometheus text exposition (``rcopy metrics``; the daemon's ``--metrics-file`` for
node_exporter's textfile collector, written atomically every loop).

Read-only: every figure comes from the store (no lock taken, no command run), so a scrape never
disturbs a sync. Metrics (gauges; labels ``group``, ``target``, and ``volume`` where per volume):

rcopy_group_info{state, role, fault} 1 · rcopy_group_up (1: started) · rcopy_group_syncing ·
rcopy_group_sync_point (generation) · rcopy_group_lag_seconds (since the cut of the last committed sync
point: the recovery point now; absent before the first) · rcopy_group_period_seconds ·
rcopy_group_last_sync_duration_seconds · rcopy_group_last_sync_sent_bytes ·
rcopy_group_last_sync_changed_bytes · rcopy_group_last_sync_commands{side="local"|"peer"} (external
commands each system ran for the last sync) · rcopy_group_alerts (alerts standing) ·
rcopy_volume_state{state} 1 · rcopy_volume_last_sync_sent_bytes · rcopy_volume_last_sync_changed_bytes ·
rcopy_volume_sync_done_bytes (acknowledged by the backup) · rcopy_volume_sync_total_bytes ·
rcopy_link_up{target, address} (absent while unknown) · rcopy_alerts{kind} (alerts standing, per kind).
"""
from __future__ import annotations

import os
import tempfile
import time

from rcopy.model import ALERT_KINDS, Group, LinkState
from rcopy.state import Store


def figures(store: Store, g: Group, now: float | None = None) -> dict:
    """Lag, the cut it is measured from, and the last sync's duration and bytes (None: no such sync)."""
    now = time.time() if now is None else now
    report = store.report(g.name)
    point = store.committed_point(g.name)
    cut = (point.cut or point.started) if point else 0.0     # on a backup the cut is not known: its begin
    if "seconds" in report:
        seconds = report["seconds"]
    elif g.last_sync_end >= g.last_sync_start > 0:
        seconds = round(g.last_sync_end - g.last_sync_start, 3)
    else:
        seconds = None
    return {"cut": cut, "lag_seconds": round(max(0.0, now - cut), 3) if cut else None,
            "last_sync_seconds": seconds,
            "last_sync_bytes_sent": report.get("bytes_sent", 0) if report else None,
            "last_sync_bytes_changed": report.get("bytes_changed", 0) if report else None,
            "report": report}


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    def __init__(self):
        self.order: list[str] = []
        self.help: dict[str, str] = {}
        self.samples: dict[str, list[str]] = {}

    def declare(self, name: str, text: str):
        self.order.append(name)
        self.help[name] = text
        self.samples[name] = []

    def add(self, name: str, value, **labels):
        if value is None:
            return
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        v = float(value)
        text = str(int(v)) if v.is_integer() and abs(v) < 2 ** 53 else repr(v)
        self.samples[name].append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")

    def text(self) -> str:
        out = []
        for name in self.order:
            out.append(f"# HELP {name} {self.help[name]}")
            out.append(f"# TYPE {name} gauge")
            out.extend(self.samples[name])
        return "\n".join(out) + "\n"


_GROUP = [
    ("rcopy_group_info", "the group's state, role and fault (why it stopped) as labels; always 1"),
    ("rcopy_group_up", "1 when the group is started (periodic syncs run), else 0"),
    ("rcopy_group_syncing", "1 while a sync point is recorded in flight"),
    ("rcopy_group_sync_point", "generation of the last committed sync point (0: never synced)"),
    ("rcopy_group_lag_seconds", "seconds since the cut of the last committed sync point: the recovery point now"),
    ("rcopy_group_period_seconds", "the group's resync period"),
    ("rcopy_group_last_sync_duration_seconds", "duration of the last completed sync"),
    ("rcopy_group_last_sync_sent_bytes", "payload bytes the last completed sync sent"),
    ("rcopy_group_last_sync_changed_bytes", "bytes the last completed sync found changed (data and zero runs)"),
    ("rcopy_group_last_sync_commands", "external commands run for the last completed sync, per side"),
    ("rcopy_group_alerts", "alerts standing for the group"),
    ("rcopy_volume_state", "the volume's state as a label; always 1"),
    ("rcopy_volume_last_sync_sent_bytes", "payload bytes the last completed sync sent for the volume"),
    ("rcopy_volume_last_sync_changed_bytes", "bytes of the volume the last completed sync found changed"),
    ("rcopy_volume_sync_done_bytes", "bytes of the sync in flight the backup acknowledged"),
    ("rcopy_volume_sync_total_bytes", "bytes the sync in flight writes (an estimate until its change scan ends)"),
    ("rcopy_link_up", "1 when the link answered last time it was tried, 0 when it did not (absent: unknown)"),
    ("rcopy_alerts", "alerts standing on this system, per kind"),
]


def render(store: Store, now: float | None = None) -> str:
    """Every group, volume, link and alert of this system in Prometheus text exposition format 0.0.4."""
    now = time.time() if now is None else now
    m = _Families()
    for name, text in _GROUP:
        m.declare(name, text)
    for g in store.groups():
        f = figures(store, g, now)
        rep = f["report"]
        gl = {"group": g.name, "target": g.target}
        m.add("rcopy_group_info", 1, **gl, state=g.state.value, role=g.role.value, fault=g.fault)
        m.add("rcopy_group_up", int(g.state.value == "started"), **gl)
        m.add("rcopy_group_syncing", int(bool(g.pending_generation)), **gl)
        m.add("rcopy_group_sync_point", g.generation, **gl)
        m.add("rcopy_group_lag_seconds", f["lag_seconds"], **gl)
        m.add("rcopy_group_period_seconds", g.period or None, **gl)
        m.add("rcopy_group_last_sync_duration_seconds", f["last_sync_seconds"], **gl)
        m.add("rcopy_group_last_sync_sent_bytes", f["last_sync_bytes_sent"], **gl)
        m.add("rcopy_group_last_sync_changed_bytes", f["last_sync_bytes_changed"], **gl)
        m.add("rcopy_group_last_sync_commands", rep.get("commands"), **gl, side="local")
        m.add("rcopy_group_last_sync_commands", rep.get("peer_commands"), **gl, side="peer")
        m.add("rcopy_group_alerts", len(store.alerts(g.name)), **gl)
        per = rep.get("volumes", {})
        for v in store.volumes(g.name):
            vl = {**gl, "volume": v.name}
            m.add("rcopy_volume_state", 1, **vl, state=v.state.value)
            m.add("rcopy_volume_last_sync_sent_bytes", per.get(v.name, {}).get("bytes_sent", v.bytes_sent), **vl)
            m.add("rcopy_volume_last_sync_changed_bytes", per.get(v.name, {}).get("bytes_changed"), **vl)
            if v.state.value == "syncing":
                m.add("rcopy_volume_sync_done_bytes", v.bytes_done, **vl)
                m.add("rcopy_volume_sync_total_bytes", v.bytes_total, **vl)
    for link in store.links():
        if link.state is not LinkState.UNKNOWN:
            m.add("rcopy_link_up", int(link.state is LinkState.UP), target=link.target, address=link.address)
    standing = store.alerts()
    for kind in ALERT_KINDS:
        m.add("rcopy_alerts", sum(a.kind == kind for a in standing), kind=kind)
    return m.text()


def write_textfile(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same directory, then rename), so
    node_exporter never reads half a file; mode 0644 (it runs as another user)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
