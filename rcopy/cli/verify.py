"""``rcopy verify GROUP [--json]``: hash every secondary (through the agent) and the primary snapshot of
the last sync point, and report any difference (exit 15 when one differs)."""
from __future__ import annotations

from rcopy import backends
from rcopy.app.local import open_store
from rcopy.app.session import connect
from rcopy.cli.common import print_json
from rcopy.engine.cycle import base_snap
from rcopy.errors import NotFound, Refused, SyncFailed, WrongRole


def register(sub):
    p = sub.add_parser("verify", help="compare every secondary with the primary snapshot of the last sync point")
    p.add_argument("group")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=do_verify)


def do_verify(args):
    store = open_store()
    g = store.group(args.group)
    if not g.sends:
        raise WrongRole(f"group {g.name} is {g.role.value} here: run verify on the system that sends (primary "
                        "or primary-rev)")
    if not g.generation:
        raise Refused(f"group {g.name} has no sync point yet: start it first")
    results = []
    with store.lock(g.name, "a sync"), connect(store, g.target) as peer:
        remote = peer.call("hash", group=g.name)
        for v in store.volumes(g.name):
            snapper = backends.get(v.backend).snapshotter
            name = base_snap(g, v, g.generation)[2]
            snap = snapper.find(v.local, name)
            if snap is None:
                raise NotFound(f"snapshot {name} of the last sync point is missing: cannot verify {v.name}; "
                               f"the next sync will be full")
            mine, theirs = backends.digest(snap.path), remote.get(v.remote)
            results.append({"volume": v.name, "primary": mine, "secondary": theirs, "equal": mine == theirs})
    if args.json:
        print_json({"group": g.name, "sync_point": g.generation, "volumes": results})
    else:
        for r in results:
            print(f"{r['volume']}: {'equal' if r['equal'] else 'DIFFERENT'} (sha256 {r['primary'][:16]}"
                  + ("" if r["equal"] else f" vs {str(r['secondary'])[:16]}") + ")")
    bad = [r["volume"] for r in results if not r["equal"]]
    if bad:
        raise SyncFailed(f"group {g.name}: {', '.join(bad)} differ from sync point {g.generation}: run 'rcopy sync --full {g.name}'")
    if not args.json:
        print(f"group {g.name}: every secondary equals sync point {g.generation}")
    return 0
