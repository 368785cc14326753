"""``rcopy daemon``: runs the periodic syncs and auto_recover of every primary group of this system.

Each tick it reads the groups from the store, records which links answer the kernel's routing
(rcopy.sys.netlink), and starts, in a thread per group, the syncs that are due (rcopy.engine.schedule)
or that auto_recover may retry now that a link is back (at once when the kernel reports an interface
up, rcopy.sys.netlink.CarrierWatch). A sync takes the group lock like the CLI does,
so a manual ``rcopy sync`` and the daemon never run one group twice. On a backup it rolls back a sync
whose agent was killed (its lock is free), and on every system it keeps thin pools from filling with
rcopy's own snapshots (rcopy.app.space). Each loop it also refreshes the alerts that follow recorded
states (rcopy.app.alerts) and, with ``--metrics-file``, rewrites the Prometheus textfile
(rcopy.app.metrics). Before starting anything it stops the groups whose volume devices are gone, resized
or read-only (rcopy.app.devices); a udev event on a block device wakes the loop at once. Logs go to stderr (the journal under systemd); alerts also go to syslog with
their priority (rcopy.app.alerts).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from rcopy.engine import schedule as scheduler
from rcopy.sys import netlink as links
from rcopy.engine.states import SENDING_ROLES
from rcopy.errors import RcopyError
from rcopy.model import LinkState

log = logging.getLogger("rcopy.daemon")


class Service:
    def __init__(self, store, sync: Callable, *, settle: Callable | None = None,
                 probe: Callable[[str], bool] = links.route_up, clock: Callable[[], float] = time.time,
                 guard: Callable[[], list] | None = None, guard_every: float = 5.0,
                 abandoned: Callable | None = None, observe: Callable[[], None] | None = None,
                 devices: Callable[[], list] | None = None):
        self.store, self.sync, self.probe, self.clock = store, sync, probe, clock
        self.settle = settle or (lambda group: None)
        self.guard, self.guard_every, self._guarded = guard, guard_every, 0.0   # rcopy.app.space
        self.abandoned = abandoned                                               # Agent.rollback_abandoned
        self.observe_fn = observe             # alerts that follow states, the metrics textfile (each loop)
        self.devices = devices                # rcopy.app.devices.check
        self.wake = threading.Event()         # set by the udev watch (or a signal): loop again now
        self.running: dict[str, threading.Thread] = {}
        self.recover_attempt: dict[str, float] = {}
        self.came_up = ""                     # an interface the carrier watch saw come up, not yet acted on

    def links_up(self, target: str) -> bool:
        up = False
        for t in self.store.targets():
            if t.name != target:
                continue
            for link in t.links:
                ok = self.probe(link)
                self.store.set_link_state(t.name, link, LinkState.UP if ok else LinkState.DOWN)
                up = up or ok
        return up

    def carrier_up(self, ifname: str) -> None:
        """An interface came up (rcopy.sys.netlink.CarrierWatch): auto_recover retries now, not at the
        end of its RECOVER_RETRY wait."""
        self.came_up = ifname
        self.recover_attempt.clear()
        self.wake.set()

    def tick(self) -> list[tuple[str, str]]:
        """Start what is due; return (group, why) for each sync started."""
        now = self.clock()
        started = []
        came_up, self.came_up = self.came_up, ""
        for name in [n for n, t in self.running.items() if not t.is_alive()]:
            del self.running[name]
        for g in self.store.groups():
            if g.role not in SENDING_ROLES and (g.pending_generation or g.tidy) and self.abandoned is not None:
                self.abandoned(g)             # the backup's side: a killed agent's sync rolled back, or its tidy-up done
            if g.role not in SENDING_ROLES or g.name in self.running:
                continue
            live = self.store.held(g.name) if g.syncing else False
            if scheduler.due(g, now, live):
                why = "reconcile, then sync" if g.syncing else "period"
            elif scheduler.needs_settle(g, live) and now - self.recover_attempt.get(g.name, 0.0) >= scheduler.RECOVER_RETRY:
                self.recover_attempt[g.name] = now
                why = "reconcile"
            elif scheduler.should_recover(g, now, self.recover_attempt.get(g.name, 0.0)):
                # the next look is RECOVER_RETRY away, or as soon as an interface comes up
                self.recover_attempt[g.name] = now
                if not self.links_up(g.target):
                    log.info("group %s: auto_recover waits for a link to %s", g.name, g.target)
                    continue
                why = f"auto_recover: {came_up} came up" if came_up else "auto_recover"
            else:
                continue
            t = threading.Thread(target=self._run, args=(g.name, why), name=f"sync-{g.name}", daemon=True)
            self.running[g.name] = t
            t.start()
            started.append((g.name, why))
        return started

    def guard_space(self) -> list:
        """Every few seconds: give full thin pools' blocks back to the applications (rcopy.app.space)."""
        now = self.clock()
        if self.guard is None or now - self._guarded < self.guard_every:
            return []
        self._guarded = now
        try:
            return self.guard()
        except RcopyError as e:
            log.warning("space guard: %s", e)
            return []

    def watch_devices(self) -> list:
        """Each loop, before anything starts: stop the groups whose volume devices changed (rcopy.app.devices)."""
        if self.devices is None:
            return []
        try:
            stopped = self.devices()
        except (RcopyError, OSError) as e:
            log.warning("device watch: %s", e)
            return []
        for group, reason in stopped:
            log.warning("group %s stopped: %s", group, reason)
        return stopped

    def observe(self) -> None:
        """Each loop: refresh the alerts that follow recorded states and write the metrics textfile."""
        if self.observe_fn is None:
            return
        try:
            self.observe_fn()
        except (RcopyError, OSError) as e:
            log.warning("metrics and alerts: %s", e)

    def _run(self, group: str, why: str):
        log.info("group %s: sync (%s)", group, why)
        try:
            if why == "reconcile":
                self.settle(group)
                return
            report = self.sync(group)
            log.info("group %s: sync point %s committed, %s bytes sent in %.1f s", group, report.generation,
                     report.bytes_sent, report.seconds)
        except RcopyError as e:
            log.warning("group %s: %s", group, e)
        except Exception:                     # a bug: keep serving the other groups
            log.exception("group %s: internal error during sync", group)

    def wait(self):
        for t in list(self.running.values()):
            t.join()

    def serve(self, tick: float = 1.0, stop: threading.Event | None = None):
        stop = stop or threading.Event()
        log.info("rcopy daemon serving %s", self.store.dir)
        due = 0.0
        while not stop.is_set():
            self.watch_devices()              # every loop: a udev wake-up looks at the devices only
            if time.monotonic() >= due:
                self.tick()
                self.guard_space()
                self.observe()
                due = time.monotonic() + tick
            self.wake.wait(max(0.0, due - time.monotonic()))
            self.wake.clear()
        self.wait()
