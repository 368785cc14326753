"""``rcopy status [groups|targets|links|alerts] [NAME] [--json]``: what 3PAR's showrcopy shows.

``--json`` output (stable; new keys may be added, none renamed or removed):
``{"system": NAME, "groups": [GROUP...], "targets": [TARGET...]}`` where
GROUP = ``{name, target, role, mode, period (seconds or null), policies [..], state, reason, fault (why
it stopped, for policy: admin, link, interrupted, device, space, state, auth, failed; "" while running), alert
(the messages of its alerts joined by "; ", "" for none), alerts [ALERT...],
sync_point {generation, id, cut (Unix seconds of its cut; 0: never synced)} (generation 0: never
synced), lag_seconds (seconds since the cut of the last committed sync point: the recovery point now;
null before the first; on a backup measured from its own begin of that point, slightly earlier),
last_sync_seconds (duration of the last completed sync, null: none), last_sync_bytes_sent (payload),
last_sync_bytes_changed (data and zero runs found changed; null: no sync yet), syncing (bool), busy (bool: a
process holds the group right now: a sync starting, running or finishing, a reconcile, an agent serving
it; what to wait for before reading the volumes), syncing_generation,
last_sync_start, last_sync_end (Unix seconds, 0: never), next_sync (Unix seconds of the next
periodic sync, null: on demand only), last_sync REPORT ({} before the first), failover_point (the sync
point this system took over at, 0: none), kept {volume path: [snapshot names]} (F: failover bases, K:
a demoted primary's writes after its last sync point, kept until the administrator removes them),
volumes [VOLUME...]}``, role one of primary, secondary, primary-rev, secondary-rev, and fault also
"failover" (fenced: the backup took over),
REPORT = ``{generation, seconds, setup_seconds (before the sync itself: the agent's connect, reconcile, the
device check), bytes_sent, bytes_changed, phases {begin, cut, send, commit; check when confirmed} (seconds; send includes
change detection), commands (external commands this system ran), processes (of those, the ones that
started a process: LVM commands run in rcopy's lvm shell start none), commands_by_tool {tool: n},
peer_commands, peer_processes (the backup's), volumes {name: {bytes_sent, bytes_changed, full_reason}}, plan [executed actions],
confirmed (true: nothing was written since that sync point, which was confirmed current, not replaced)}``,
VOLUME = ``{name, local, remote, size, backend (thin, cow, file), state, percent (while syncing),
bytes_done (acknowledged by the backup), bytes_total (what the sync writes: an estimate until the change
scan ends), last_sync, bytes_sent, bytes_changed (by the last completed sync), full_reason ("" for a
delta)}``,
ALERT = ``{kind (over_period, link_down, target_failed, stale, space, device), object, group, message, since}``
(rcopy.app.alerts). ``status alerts [NAME] [--json]`` prints ``{system, alerts [ALERT...]}``, NAME
filtering by group, target or object.
TARGET = ``{name, agent, links [{address, state, since}]}`` (since: when the link was last found in
that state, Unix seconds, null before any probe). ``status links`` prints only targets' links.
"""
from __future__ import annotations

import time

from rcopy.app import metrics
from rcopy.app.local import kept, open_store
from rcopy.sys import lvm
from rcopy.cli.common import print_json
from rcopy.engine.schedule import next_start
from rcopy.model import format_period



def _commands(rep: dict, side: str = "") -> str:
    """'N' external commands, with how many were processes when some ran in the lvm shell."""
    n, p = rep.get(side + "commands"), rep.get(side + "processes")
    if n is None:
        return "-"
    return f"{n} ({p} processes)" if p is not None and p != n else str(n)

def register(sub):
    p = sub.add_parser("status", help="show groups, volumes, targets and links (like showrcopy)")
    p.add_argument("what", nargs="?", choices=["groups", "targets", "links", "alerts"], default=None)
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output (documented, stable)")
    p.set_defaults(func=do_status)


def group_dict(store, g, now: float | None = None) -> dict:
    busy = store.held(g.name)
    live = bool(g.pending_generation) and busy   # a crashed sync leaves its record but no lock holder
    vols = []
    for v in store.volumes(g.name):
        state = v.state.value
        if state == "syncing" and not live:
            state = "syncing-interrupted"
        vols.append({"name": v.name, "local": v.local, "remote": v.remote, "size": v.size, "state": state,
                     "backend": v.backend,
                     "percent": v.percent, "bytes_done": v.bytes_done, "bytes_total": v.bytes_total,
                     "last_sync": v.last_sync, "bytes_sent": v.bytes_sent, "full_reason": v.full_reason})
    reason = g.reason
    if g.pending_generation and not live:
        reason = (reason + "; " if reason else "") + \
            f"sync point {g.pending_generation} was interrupted: the next run reconciles it"
    f = metrics.figures(store, g, now)
    report = f["report"]
    for v in vols:
        v["bytes_changed"] = report.get("volumes", {}).get(v["name"], {}).get("bytes_changed", 0)
    group_alerts = [a.as_dict() for a in store.alerts(g.name)]
    return {"name": g.name, "target": g.target, "role": g.role.value, "mode": g.mode, "period": g.period,
            "policies": sorted(g.policies), "state": g.state.value, "reason": reason, "fault": g.fault,
            "alert": "; ".join(a["message"] for a in group_alerts), "alerts": group_alerts,
            "sync_point": {"generation": g.generation, "id": g.sync_id, "cut": f["cut"]}, "syncing": live,
            "busy": busy,
            "lag_seconds": f["lag_seconds"], "last_sync_seconds": f["last_sync_seconds"],
            "last_sync_bytes_sent": f["last_sync_bytes_sent"], "last_sync_bytes_changed": f["last_sync_bytes_changed"],
            "syncing_generation": g.pending_generation, "last_sync_start": g.last_sync_start,
            "last_sync_end": g.last_sync_end, "next_sync": _next(g), "last_sync": report,
            "failover_point": g.failover_point, "kept": kept(store, g), "volumes": vols}


def _next(g) -> float | None:
    """When the daemon starts the next periodic sync (None: on demand only, or not started)."""
    if g.role.value not in ("primary", "primary-rev") or g.state.value != "started":
        return None
    return next_start(g.period, g.last_sync_start, g.last_sync_end)


def target_dict(store, t) -> dict:
    return {"name": t.name, "agent": t.agent_template,
            "links": [{"address": l.address, "state": l.state.value, "since": l.since or None}
                      for l in store.links(t.name)]}


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def alerts_out(store, name: str | None) -> list[dict]:
    return [a.as_dict() for a in store.alerts() if not name or name in (a.group, a.object)
            or a.object.startswith(name + "/")]


def do_status(args):
    store = open_store()
    what = args.what
    if what == "alerts":
        out = {"system": store.system().name, "alerts": alerts_out(store, args.name)}
        if args.json:
            print_json(out)
            return 0
        if not out["alerts"]:
            print(f"System: {out['system']}: no alerts")
        for a in out["alerts"]:
            print(f"{_when(a['since'])}  {a['kind']:<13} {a['object']:<24} {a['message']}")
        return 0
    groups = [store.group(args.name)] if args.name and what in (None, "groups") else store.groups()
    targets = [store.target(args.name)] if args.name and what in ("targets", "links") else store.targets()
    out = {"system": store.system().name}
    if what in (None, "groups"):
        with lvm.reports():                   # kept snapshots: one LVM report per VG
            out["groups"] = [group_dict(store, g) for g in groups]
    if what in (None, "targets", "links"):
        out["targets"] = [target_dict(store, t) for t in targets]
    if args.json:
        print_json(out)
        return 0
    print(f"System: {out['system']}")
    for g in out.get("groups", []):
        sp = g["sync_point"]
        print(f"\nGroup {g['name']}  target {g['target']}  role {g['role']}  mode {g['mode']}  "
              f"period {format_period(g['period'])}  policies {','.join(g['policies']) or '-'}")
        line = f"  state {g['state']}" + (f" ({g['reason']})" if g["reason"] else "")
        line += f"  sync point {sp['generation']}" + (f" (syncing {g['syncing_generation']})" if g["syncing"] else "")
        print(line + f"  last sync {_when(g['last_sync_end'])}"
              + (f"  next {_when(g['next_sync'])}" if g["next_sync"] else "")
              + (f"  lag {_duration(g['lag_seconds'])}" if g["lag_seconds"] is not None else "  lag -"))
        rep = g["last_sync"]
        if rep:
            phases = " ".join(f"{k} {v:.1f}" for k, v in rep.get("phases", {}).items())
            if rep.get("confirmed"):
                print(f"  last sync: point {rep.get('generation')} confirmed current (nothing written since its "
                      f"cut), {rep.get('seconds', 0):.1f} s ({phases}), commands here {_commands(rep)}")
            else:
                print(f"  last sync: point {rep.get('generation')}, {rep.get('seconds', 0):.1f} s ({phases}), "
                      f"{rep.get('bytes_changed', 0)} bytes changed, {rep.get('bytes_sent', 0)} bytes sent, "
                      f"commands here {_commands(rep)}, on {g['target']} {_commands(rep, 'peer_')}")
        for a in g["alerts"]:
            print(f"  ALERT {a['kind']} since {_when(a['since'])}: {a['message']}")
        if g["failover_point"]:
            print(f"  failed over here at sync point {g['failover_point']}")
        for path, names in g["kept"].items():
            print(f"  kept snapshots of {path}: {', '.join(names)} (rcopy never deletes K; lvremove when done)")
        print(f"  {'volume':<16} {'local':<28} {'remote':<28} {'state':<12} {'last sync':<19} {'sent':>12}  note")
        for v in g["volumes"]:
            state = f"{v['state']} {v['percent']}%" if v["state"] == "syncing" else v["state"]
            note = f"full: {v['full_reason']}" if v["full_reason"] else ""
            print(f"  {v['name']:<16} {v['local']:<28} {v['remote']:<28} {state:<12} {_when(v['last_sync']):<19} "
                  f"{v['bytes_sent']:>12}  {note}")
    for t in out.get("targets", []):
        links = ", ".join(f"{l['address']} {l['state']}" + (f" since {_when(l['since'])}" if l["since"] else "")
                          for l in t["links"])
        print(f"\nTarget {t['name']}  links: {links}  agent: {t['agent']}")
    return 0
