"""The lab's one API: :class:`Lab` drives both VMs; :func:`main` is scripts/lab on top of it.

State kept in the instance directory (RCOPY_LAB_DIR): which image the VMs booted from (``image``) and
the wanted state of the replication link (``link``), so a VM started after a crash gets the link state
the other end has.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from rcopylab import image as images
from rcopylab import push as pusher
from rcopylab.config import HOSTS, LINKS, Config, load
from rcopylab.errors import BootFailed, GuestCommandFailed, GuestHung, LabUsage, NotRunning, one_line
from rcopy.sys.run import CommandTimeout
from rcopylab.ssh import Ssh, shell_text
from rcopylab.vm import Vm
from rcopy.errors import RcopyError

RESET_SCRIPT = Path(__file__).resolve().parent / "guest" / "reset.sh"


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What a command in a VM did (the shape of subprocess.CompletedProcess)."""
    host: str
    args: str
    returncode: int
    stdout: str
    stderr: str


class Lab:
    def __init__(self, cfg: Config | None = None, log=print):
        self.cfg = cfg or load()
        self.log = log

    # --- parts -------------------------------------------------------------------------------------
    @property
    def image(self) -> images.Image:
        """The image the instance booted from (kept while it exists), else the current recipe's."""
        booted = self.cfg.dir / "image"
        if booted.exists():
            return images.Image(Path(booted.read_text().strip()))
        return images.image_for(self.cfg.cache)

    def vm(self, host: str) -> Vm:
        if host not in HOSTS:
            raise LabUsage(f"no VM named {host!r}: the lab has {' and '.join(HOSTS)}")
        return Vm(self.cfg, host, self.image)

    def ssh(self, host: str) -> Ssh:
        return Ssh(host, self.cfg.ssh_port(host), self.image.key, self.cfg.sockets / f"{host}.ssh")

    def _both(self, fn, hosts=HOSTS) -> list:
        """fn(host) for each host at once (the VMs boot and work in parallel); first error wins."""
        if not hosts:
            return []
        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
            return [f.result() for f in [pool.submit(fn, h) for h in hosts]]

    # --- verbs -------------------------------------------------------------------------------------
    def build(self) -> images.Image:
        return images.build(self.cfg.cache, self.log)

    def up(self, push: bool = True) -> None:
        """Boot every VM not running, on fresh disks; wait until both answer; install the working tree."""
        t0 = time.monotonic()
        down = [h for h in HOSTS if not self.vm(h).alive()]
        if down:
            if len(down) == len(HOSTS):
                image = self.build()
                self.cfg.dir.mkdir(parents=True, exist_ok=True)
                (self.cfg.dir / "image").write_text(f"{image.dir}\n")
                for k in LINKS:
                    self._set_link_state(True, k)
            for h in down:
                self.vm(h).create_disks()
            self._both(self._boot, down)
            self.log(f"lab: {', '.join(down)} booted in {time.monotonic() - t0:.0f} s "
                     f"(accel {self.cfg.accel}; ssh ports {self.cfg.ssh_port(HOSTS[0])}-{self.cfg.ssh_port(HOSTS[1])})")
        elif self.image.dir != images.image_for(self.cfg.cache).dir:
            self.log("lab: note: the VMs run an older image; 'scripts/lab down && scripts/lab up' to refresh")
        if push:
            self.push()

    def ensure_up(self) -> None:
        """Reuse the instance if both VMs answer (installing the working tree), else boot it afresh."""
        if self.healthy():
            self.push()
        else:
            self.down()
            self.up()

    def _boot(self, host: str) -> None:
        vm = self.vm(host)
        vm.boot()
        if not self.ssh(host).wait_ready(time.monotonic() + self.cfg.boot_timeout, vm.alive):
            raise BootFailed(host=host, seconds=self.cfg.boot_timeout, console=vm.console_tail())
        for k in LINKS:
            if not self._link_state(k):
                vm.set_link(False, k)

    def healthy(self) -> bool:
        try:
            return all(self.vm(h).alive() and self.run(h, "true", check=False, timeout=30).returncode == 0
                       for h in HOSTS)
        except RcopyError:
            return False

    def push(self) -> None:
        """Install the working tree's rcopy in both VMs (no image rebuild, no reboot)."""
        t0 = time.monotonic()
        self._require(HOSTS)
        wheel = pusher.build_wheel(self.cfg.dir / "wheels")
        versions = self._both(lambda h: pusher.install(self.ssh(h), wheel))
        self.log(f"lab: pushed {wheel.name} to {', '.join(HOSTS)} in {time.monotonic() - t0:.0f} s ({versions[0]})")

    def run(self, host: str, cmd, *, check: bool = True, input=None, timeout: float = 300.0) -> GuestResult:
        """Run cmd as root in host (a string goes to the shell as is, a list is quoted word by word)."""
        self._require([host])
        try:
            res = self.ssh(host).run(cmd, input=input, timeout=timeout, check=check)
        except CommandTimeout:
            raise GuestHung(host=host, cmd=shell_text(cmd)[:200], timeout=timeout,
                            console=self.vm(host).hung_report()) from None
        return GuestResult(host, shell_text(cmd), res.rc, res.stdout, res.stderr)

    def stream(self, host: str, cmd) -> int:
        self._require([host])
        return self.ssh(host).stream(cmd)

    def link(self, up: bool, n: int | None = None) -> None:
        """Cut (up=False) or restore replication link ``n`` (1 or 2; None: both), at both ends."""
        ns = LINKS if n is None else (n,)
        live = [h for h in HOSTS if self.vm(h).alive()]
        for k in ns:
            self._set_link_state(up, k)
            for h in live:
                self.vm(h).set_link(up, k)
        self._both(lambda h: [self._wait_carrier(h, up, k) for k in ns], live)

    def throttle(self, host: str, rate: str | None) -> None:
        """Limit what ``host`` sends over the replication link to ``rate`` (tc's words, e.g. "16mbit"), or
        lift the limit (None). A test that must act in the middle of a transfer throttles it rather than
        race it: emulated disks run at a speed the host's load decides. ``reset`` lifts it too."""
        # both links: a sync spread over them is throttled as a whole
        if rate is None:
            self.run(host, "for l in /run/lab-link /run/lab-link2; do tc qdisc del dev $(cat $l) root 2>/dev/null; "
                           "done; rm -f /run/lab-throttle")
        else:
            self.run(host, f"for l in /run/lab-link /run/lab-link2; do tc qdisc replace dev $(cat $l) root tbf "
                           f"rate {rate} burst 64kb latency 2s || exit 1; done && touch /run/lab-throttle")

    def stall_after(self, host: str, sent: int, pid_file: str, timeout: float = 600,
                    links: tuple[int, ...] = LINKS) -> bool:
        """Wait until ``host`` has sent ``sent`` bytes over its throttled ``links``, then drop all it sends
        there.

        The wait and the stall run in the guest itself, a tenth of a second apart: a fault meant for the
        middle of a transfer lands there however long this machine takes to poll a status (a loaded CI
        machine once took long enough for a sync to finish sending and commit between two polls). Needs
        :meth:`throttle` set first (its counters are what is read); ``throttle(host, None)`` lifts the
        stall too. False if the process whose pid is in ``pid_file`` ended before that many bytes went."""
        links = " ".join(f"$(cat /run/lab-link{'' if n == 1 else n})" for n in links)
        script = (f"while kill -0 $(cat {pid_file}) 2>/dev/null; do "
                  f"n=$(for l in {links}; do tc -s qdisc show dev $l root; done | awk '/Sent/{{s+=$2}} END{{print s+0}}'); "
                  f"if [ $n -ge {sent} ]; then for l in {links}; do "
                  f"tc qdisc replace dev $l root netem loss 100% || exit 2; done; touch /run/lab-throttle; exit 0; fi; "
                  f"sleep 0.1; done; exit 1")
        r = self.run(host, script, check=False, timeout=timeout)
        if r.returncode == 2:
            raise GuestCommandFailed(cmd="tc qdisc replace ... netem loss 100%", host=host, rc=2, last=r.stderr.strip())
        return r.returncode == 0

    def _wait_carrier(self, host: str, up: bool, n: int = 1) -> None:
        """Return once the guest itself sees the link state (its link watch lags qemu by up to ~1 s)."""
        want, nic = "up" if up else "down", f"/run/lab-link{'' if n == 1 else n}"
        self.run(host, f"for i in $(seq 100); do [ $(cat /sys/class/net/$(cat {nic})/operstate) = {want} ] "
                       f"&& exit 0; sleep 0.1; done; echo link {n} still not {want} >&2; exit 1", timeout=60)

    def crash(self, host: str) -> None:
        self.vm(host).crash()
        self.ssh(host).stop_master()

    def start(self, host: str) -> None:
        """Boot a crashed or stopped VM again on its disks as they were."""
        if self.vm(host).alive():
            self.log(f"lab: {host} is already running")
            return
        t0 = time.monotonic()
        self._boot(host)
        self.log(f"lab: {host} booted in {time.monotonic() - t0:.0f} s")

    def reset(self) -> None:
        """Both VMs running, link up, data disks empty, no rcopy state: the start of every lab test."""
        t0 = time.monotonic()
        stopped = [h for h in HOSTS if not self.vm(h).alive()]
        if stopped and not all(self.vm(h).disk("root").exists() for h in stopped):
            raise NotRunning(host=stopped[0])
        if stopped:
            self._both(self._boot, stopped)
        if not all(self._link_state(k) for k in LINKS):   # lab.link() is the only way a link goes down
            self.link(True)
        script = RESET_SCRIPT.read_text()
        self._both(lambda h: self._reset_one(h, script))
        self.log(f"lab: reset in {time.monotonic() - t0:.1f} s")

    def _reset_one(self, host: str, script: str) -> None:
        """Reset one guest; a guest the last test left hung (a dm device suspended for good, a task
        blocked in the kernel) is power-cycled once and reset again, so one bad test does not fail
        every later test on this instance. Its console tail goes to the log: the hang is a finding."""
        try:
            self.run(host, "bash -s", input=script, timeout=180)
        except GuestHung as e:
            self.log(f"lab: {host} hung in its reset; power-cycling it ({e})")
            self.crash(host)
            self._boot(host)
            self.run(host, "bash -s", input=script, timeout=180)

    def down(self) -> None:
        for h in HOSTS:
            self.ssh(h).stop_master()
            self.vm(h).quit()
        shutil.rmtree(self.cfg.sockets, ignore_errors=True)
        (self.cfg.dir / "image").unlink(missing_ok=True)

    def status(self) -> list[str]:
        lines = []
        for h in HOSTS:
            vm = self.vm(h)
            state = f"running (pid {vm.pid()})" if vm.alive() else "stopped"
            lines.append(f"{h}: {state}, ssh 127.0.0.1:{self.cfg.ssh_port(h)}, console {vm.console}")
        lines.append(f"links: {', '.join(f'{k} ' + ('up' if self._link_state(k) else 'down') for k in LINKS)}; instance {self.cfg.dir}; image {self.image.dir}")
        return lines

    # --- helpers -----------------------------------------------------------------------------------
    def _require(self, hosts) -> None:
        for h in hosts:
            if not self.vm(h).alive():
                raise NotRunning(host=h)

    def _link_state(self, n: int = 1) -> bool:
        path = self.cfg.dir / f"link{'' if n == 1 else n}"
        return not path.exists() or path.read_text().strip() != "down"

    def _set_link_state(self, up: bool, n: int = 1) -> None:
        self.cfg.dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.dir / f"link{'' if n == 1 else n}").write_text("up\n" if up else "down\n")


# --- command line ------------------------------------------------------------------------------------
USAGE = """scripts/lab VERB ...   (instance: $RCOPY_LAB_DIR, default <repo>/.lab)
  build                 build the VM image (cached by recipe hash under ~/.cache/rcopy-lab)
  up                    boot both VMs (fresh disks for any not running), install the working tree
  push                  reinstall the working tree's rcopy into the running VMs
  run HOST -- CMD...    run CMD as root in HOST (primary|backup), stream output, exit with its status
  link down|up [N]      cut / restore replication link N (1 or 2; both without N)
  crash HOST            kill HOST at once (power cut); start HOST boots it again on the same disks
  start HOST
  reset                 start crashed VMs, link up, empty data disks, no rcopy state
  status                what runs where
  down                  stop both VMs"""


def _parse(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    ns = argparse.Namespace(verb=verb, host=None, cmd=None, up=None, link=None)
    if verb == "run":
        if len(rest) < 2 or rest[1] != "--" and len(rest) < 2:
            raise LabUsage("usage: scripts/lab run HOST -- CMD...")
        ns.host = rest[0]
        ns.cmd = rest[2:] if rest[1] == "--" else rest[1:]
        if not ns.cmd:
            raise LabUsage("usage: scripts/lab run HOST -- CMD...")
        ns.cmd = ns.cmd[0] if len(ns.cmd) == 1 else ns.cmd   # one word: a shell line, like ssh
    elif verb in ("crash", "start"):
        if len(rest) != 1:
            raise LabUsage(f"usage: scripts/lab {verb} HOST")
        ns.host = rest[0]
    elif verb == "link":
        if not rest or rest[0] not in ("down", "up") or len(rest) > 2 or rest[1:] not in ([], ["1"], ["2"]):
            raise LabUsage("usage: scripts/lab link down|up [1|2]")
        ns.up, ns.link = rest[0] == "up", int(rest[1]) if len(rest) == 2 else None
    elif verb in ("build", "up", "push", "reset", "down", "status"):
        if rest:
            raise LabUsage(f"scripts/lab {verb} takes no arguments")
    else:
        raise LabUsage(f"unknown verb {verb!r} (see 'scripts/lab --help')")
    return ns


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731 - stdout belongs to 'run'

    def verb() -> int:
        ns = _parse(argv)
        lab = Lab(log=log)
        if ns.host is not None:
            lab.vm(ns.host)   # validates the name
        if ns.verb == "run":
            return lab.stream(ns.host, ns.cmd)
        if ns.verb == "status":
            print("\n".join(lab.status()))
        elif ns.verb == "link":
            lab.link(ns.up, ns.link)
        elif ns.verb in ("crash", "start"):
            getattr(lab, ns.verb)(ns.host)
        else:
            getattr(lab, ns.verb)()
        return 0

    return one_line("lab", verb)

if __name__ == "__main__":
    sys.exit(main())
