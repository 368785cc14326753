"""``rcopy group create|set|remove|admit|dismiss|start|stop``: remote copy groups (3PAR creatercopygroup,
admitrcopyvv, startrcopygroup, stoprcopygroup). A group created here appears on its target by itself."""
from __future__ import annotations

import dataclasses
import os

from rcopy import backends
from rcopy.app import session
from rcopy.app.local import open_store
from rcopy.app.session import connect
from rcopy.cli.common import start_sync
from rcopy.engine.cycle import bases
from rcopy.names import volume_name
from rcopy.engine.states import Event, transition
from rcopy.errors import AlreadyExists, NotFound, Refused, UsageError
from rcopy.model import Group, GroupState, VolumePair, VolumeState, check_name, parse_period, parse_policies


def register(sub):
    p = sub.add_parser("group", help="create and drive remote copy groups")
    s = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = s.add_parser("create", help="create a group on this (primary) system and its mirror on the target")
    c.add_argument("group")
    c.add_argument("--target", required=True)
    c.add_argument("--mode", default="periodic", choices=["periodic"])
    c.add_argument("--period", help="resync period, 15s .. 365d (units s, m, h, d); none: on demand only")
    c.add_argument("--policy", help="comma separated: auto_recover, over_per_alert (the default) or no_over_per_alert")
    c.set_defaults(func=do_create)
    st = s.add_parser("set", help="change a group's period or policies")
    st.add_argument("group")
    st.add_argument("--period", help="new period, or 'none' for on demand only")
    st.add_argument("--policy", help="new policy list (replaces the old one); '' for none")
    st.set_defaults(func=do_set)
    r = s.add_parser("remove", help="remove a stopped group here and on its target")
    r.add_argument("group")
    r.add_argument("--keepsnap", action="store_true", help="keep the last sync point's snapshots")
    r.set_defaults(func=do_remove)
    a = s.add_parser("admit", help="add a volume pair to a stopped group")
    a.add_argument("group")
    a.add_argument("local", metavar="LOCAL_DEV")
    a.add_argument("remote", metavar="TARGET:REMOTE_DEV",
                   help="the secondary; with --create, TARGET or TARGET:NAME (default: the primary's LV name)")
    a.add_argument("--create", metavar="VG|VG/POOL", help="create the secondary on the target: thick in VG, thin in VG/POOL")
    a.add_argument("--nosync", action="store_true", help="the volumes are already equal: no initial copy")
    a.add_argument("--force", action="store_true", help="overwrite a secondary that holds data")
    a.set_defaults(func=do_admit)
    d = s.add_parser("dismiss", help="remove a volume pair from a stopped group")
    d.add_argument("group")
    d.add_argument("local", metavar="LOCAL_DEV")
    d.add_argument("--keepsnap", action="store_true")
    d.set_defaults(func=do_dismiss)
    for verb, fn, text in (("start", do_start, "start the group: initial sync, or resume by delta"),
                           ("stop", do_stop, "stop the group (no more periodic syncs)")):
        x = s.add_parser(verb, help=text)
        x.add_argument("group")
        if verb == "start":
            x.add_argument("--wait", action="store_true", help="wait for the sync, showing progress")
        x.set_defaults(func=fn)
    from rcopy.cli import disaster
    disaster.register(s)


def do_create(args):
    store = open_store()
    name = check_name("group", args.group)
    period = parse_period(args.period) if args.period else None
    policies = parse_policies(args.policy)
    target = store.target(args.target)
    if store.has_group(name):
        raise AlreadyExists(f"group {name} already exists: pick another name")
    with connect(store, target.name) as peer:
        peer.call("group_create", group=name, source=store.system().name)
    store.add_group(Group(name, target.name, mode=args.mode, period=period, policies=policies))
    print(f"group {name} created, secondary group on {target.name}")


def do_set(args):
    store = open_store()
    changes = {}
    if args.period is not None:
        changes["period"] = None if args.period in ("none", "0", "") else parse_period(args.period)
    if args.policy is not None:
        changes["policies"] = parse_policies(args.policy)
    if not changes:
        raise UsageError("nothing to change: give --period and/or --policy")
    g = store.update_group(args.group, **changes)
    print(f"group {g.name} updated")


def do_remove(args):
    store = open_store()
    g = store.group(args.group)
    transition(g, Event.REMOVE)
    with store.lock(g.name, "a sync"):
        with connect(store, g.target) as peer:
            peer.call("group_remove", group=g.name)
        if not args.keepsnap and g.generation:
            _delete_base(g, store.volumes(g.name))
        store.remove_group(g.name)
    print(f"group {g.name} removed here and on {g.target}")


def _delete_base(g: Group, vols):
    backends.delete(bases(g, vols, g.generation))


def do_admit(args):
    store = open_store()
    g = store.group(args.group)
    transition(g, Event.ADMIT)
    target, sep, remote = args.remote.partition(":")
    if not args.create and (not sep or not remote):
        raise UsageError(f"bad secondary {args.remote!r}: give TARGET:REMOTE_DEV, e.g. {g.target}:/dev/vg/data")
    if target != g.target:
        raise Refused(f"group {g.name} replicates to {g.target}, not {target}")
    local = os.path.abspath(args.local) if os.path.isfile(args.local) else args.local
    if not os.path.exists(local):
        raise NotFound(f"volume {args.local} not found: check the path")
    probe = backends.probe(local)                 # refuses what rcopy cannot snapshot; decided once, here
    other = store.volume_by_local(local, probe.identity)
    if other:
        alias = "" if other.local == local else f" (as {other.local}: the same device)"
        raise AlreadyExists(f"{local} is already in group {other.group}{alias}: dismiss it there first")
    size = backends.volume_size(local)
    name = volume_name(local)
    if any(v.name == name for v in store.volumes(g.name)):
        raise AlreadyExists(f"group {g.name} already has a volume named {name}: rename the device")
    state = VolumeState.SYNCED if args.nosync else VolumeState.NEW
    create = {}
    if args.create:
        remote = _created_name(args.create, remote, local, probe.kind)
        create = {"create": args.create, "used": backends.used_bytes(probe.kind, local)}
    with store.lock(g.name, "a sync"), connect(store, g.target) as peer:
        answer = peer.call("admit", group=g.name, path=remote, remote=local, size=size, nosync=args.nosync,
                           force=args.force, **create)
        remote = answer.get("path", remote)
        store.add_volume(VolumePair(g.name, name, local, remote, size, state=state, backend=probe.kind,
                                    device_id=probe.identity))
    print(f"{local} admitted to group {g.name} with secondary {g.target}:{remote} ({size} bytes, {probe.kind})")


def _created_name(spec: str, remote: str, local: str, kind: str) -> str:
    """The LV name ``--create VG|VG/POOL`` gives the secondary: the one asked for (NAME or
    /dev/VG/NAME), else the primary's own LV name (its file name for a file volume)."""
    vg = spec.partition("/")[0]
    if remote.startswith("/dev/"):
        parts = remote[5:].split("/")
        if len(parts) != 2 or parts[0] != vg:
            raise UsageError(f"--create {spec} makes /dev/{vg}/NAME, not {remote}: give NAME or /dev/{vg}/NAME")
        return parts[1]
    if remote:
        return remote
    if kind in backends.LVM_KINDS:
        from rcopy.sys import lvm
        return lvm.by_path(local).name
    return volume_name(local)


def do_dismiss(args):
    store = open_store()
    g = store.group(args.group)
    transition(g, Event.ADMIT)
    local = os.path.abspath(args.local) if os.path.isfile(args.local) else args.local
    v = store.volume_by_local(local)
    if v is None or v.group != g.name:
        raise NotFound(f"{args.local} is not in group {g.name}: see 'rcopy status groups {g.name}'")
    with store.lock(g.name, "a sync"), connect(store, g.target) as peer:
        peer.call("dismiss", group=g.name, path=v.remote)
        if not args.keepsnap and g.generation:
            _delete_base(g, [v])
        store.remove_volume(g.name, v.name)
    print(f"{local} dismissed from group {g.name}")


def do_start(args):
    store = open_store()
    return start_sync(store, args.group, event=Event.START, wait=args.wait)


def do_stop(args):
    store = open_store()
    with store.lock(args.group, "a sync"):
        before = store.group(args.group)
        session.settle(store, args.group)           # a crashed sync in flight is finished or rolled back first
        g = store.group(args.group)
        if g.state is GroupState.STOPPED and before.state is not GroupState.STOPPED:
            g = dataclasses.replace(g, reason="stopped by the administrator", fault="admin")
        else:
            g = transition(g, Event.STOP)
        store.put_group(g)
    print(f"group {g.name} stopped")
