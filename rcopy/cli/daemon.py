"""``rcopy daemon [--tick S] [--once]``: periodic syncs and auto_recover (run by systemd: rcopy.service)."""
from __future__ import annotations

import logging
import signal
import threading


def register(sub):
    p = sub.add_parser("daemon", help="run periodic syncs and auto_recover (systemd runs this)")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between schedule checks")
    p.add_argument("--once", action="store_true", help="start what is due, wait for it, exit")
    p.set_defaults(func=do_daemon)


def do_daemon(args):
    from rcopy.app.service import Service
    from rcopy.app.session import open_store, run_sync, settle_locked
    from rcopy.engine.states import Event
    from rcopy.state import Store

    logging.getLogger().setLevel(logging.INFO)
    store = open_store()
    service = Service(store, lambda group: run_sync(Store(store.dir), group, event=Event.SYNC),
                      settle=lambda group: settle_locked(Store(store.dir), group))
    if args.once:
        service.tick()
        service.wait()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.serve(args.tick, stop)
    return 0
