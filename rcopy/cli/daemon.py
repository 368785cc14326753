"""``rcopy daemon [--tick S] [--once] [--metrics-file PATH]``: periodic syncs and auto_recover (run by
systemd: rcopy.service), alerts, and the Prometheus textfile."""
from __future__ import annotations

import logging
import signal
import threading


def register(sub):
    p = sub.add_parser("daemon", help="run periodic syncs and auto_recover (systemd runs this)")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between schedule checks")
    p.add_argument("--once", action="store_true", help="start what is due, wait for it, exit")
    p.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="write `rcopy metrics` here atomically every loop (node_exporter's textfile "
                        "collector: a .prom file in its --collector.textfile.directory); "
                        "default $RCOPY_METRICS_FILE, none if unset")
    p.add_argument("--install-unit", action="store_true",
                   help="install the systemd unit that runs this rcopy as the daemon, then exit")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help="where --install-unit writes rcopy.service")
    p.set_defaults(func=do_daemon)


def install_unit(unit_dir: str) -> str:
    """Write rcopy.service (the packaged unit, ExecStart pointing at this rcopy) atomically; its path."""
    import os
    import shutil
    import sys
    from importlib import resources

    exe = shutil.which("rcopy") or os.path.join(os.path.dirname(sys.executable), "rcopy")
    text = resources.files("rcopy").joinpath("data/rcopy.service").read_text()
    text = text.replace("ExecStart=/usr/bin/env rcopy daemon", f"ExecStart={os.path.realpath(exe)} daemon")
    os.makedirs(unit_dir, exist_ok=True)
    path = os.path.join(unit_dir, "rcopy.service")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
    return path


def do_daemon(args):
    if args.install_unit:
        try:
            path = install_unit(args.unit_dir)
        except OSError as e:
            from rcopy.errors import PermissionDenied
            raise PermissionDenied(f"cannot write the unit into {args.unit_dir}: {e.strerror}: run as root") from None
        print(f"installed {path}; start it with: systemctl daemon-reload && systemctl enable --now rcopy")
        return 0
    from rcopy.app import devices, space
    from rcopy.app.agent import Agent
    from rcopy.app.service import Service
    from rcopy.app.local import open_store
    from rcopy.app.session import run_sync, settle_locked
    from rcopy.engine.states import Event
    from rcopy.state import Store

    import os
    from rcopy.app import alerts, metrics

    logging.getLogger().setLevel(logging.INFO)
    store = open_store()
    metrics_file = args.metrics_file or os.environ.get("RCOPY_METRICS_FILE") or None

    def observe():
        alerts.refresh(store)
        if metrics_file:
            metrics.write_textfile(metrics_file, metrics.render(store))

    service = Service(store, lambda group: run_sync(Store(store.dir), group, event=Event.SYNC),
                      settle=lambda group: settle_locked(Store(store.dir), group),
                      guard=lambda: space.guard(store), abandoned=Agent(store).rollback_abandoned,
                      observe=observe, devices=lambda: devices.check(store))
    if args.once:
        service.watch_devices()
        service.guard_space()
        service.tick()
        service.wait()
        service.observe()
        return 0
    stop = threading.Event()

    def finish(*_):
        stop.set()
        service.wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, finish)
    watches = [w for w in (_watch_udev(service), _watch_carrier(service)) if w is not None]
    try:
        service.serve(args.tick, stop)
    finally:
        for w in watches:
            w.stop()
    return 0


def _watch_udev(service):
    """Wake the daemon's loop on every block device event (its device check then looks at once); without
    udev's netlink (a container) the loop's own look each tick still finds the same faults."""
    from rcopy.sys import udev
    try:
        return udev.watch_block(lambda action, devnode: service.wake.set())
    except OSError as e:
        logging.getLogger("rcopy.daemon").warning("no udev events (%s): devices are looked at every tick", e)
        return None


def _watch_carrier(service):
    """Wake auto_recover the moment an interface comes up; without a netlink socket (a restricted
    container) it looks every RECOVER_RETRY seconds only."""
    from rcopy.engine.schedule import RECOVER_RETRY
    from rcopy.sys import netlink
    try:
        return netlink.CarrierWatch(service.carrier_up)
    except OSError as e:                      # the netlink socket refused
        logging.getLogger("rcopy.daemon").warning("no link events (%s): auto_recover retries every %.0f s",
                                                  e, RECOVER_RETRY)
        return None
