"""``rcopy sync GROUP [--wait] [--full] [--dry-run]``: resync now (3PAR syncrcopy)."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("sync", help="resync a group now (only the changed blocks)")
    p.add_argument("group")
    p.add_argument("--wait", action="store_true", help="wait for the sync, showing progress")
    p.add_argument("--full", action="store_true", help="send every volume whole")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (per volume: delta or full, and why) and change nothing")
    p.set_defaults(func=do_sync)


def do_sync(args):
    # A sync run here and now starts ssh and the backup's agent first, then imports its machinery
    # (rcopy.app.reach): the two start-ups overlap
    started = None
    if args.wait and not args.dry_run:
        from rcopy.app.reach import start_early
        started = start_early(args.group)
    try:
        from rcopy.app.local import open_store
        from rcopy.app.session import plan
        from rcopy.cli.common import start_sync
        from rcopy.engine.plan import render
        from rcopy.engine.states import Event

        store = open_store()
        full = "full sync requested by the administrator" if args.full else ""
        if args.dry_run:
            print(render(plan(store, args.group, full=full)))
            return 0
        return start_sync(store, args.group, event=Event.SYNC, full=full, wait=args.wait, started=started)
    except BaseException:
        if started is not None:
            started.close()
        raise
