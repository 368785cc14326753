"""One lab VM as a qemu process: its disks, its command line, its life (boot, crash, quit) and its NICs.

Disks: a qcow2 overlay on the shared image (the image stays pristine; the overlay survives crash/start),
and two raw sparse data disks /dev/vdb and /dev/vdc. NICs: a management NIC on qemu user networking,
closed to the outside (restrict=on) but forwarding 127.0.0.1:<port> to the guest's sshd; and the
replication link, a UDP tunnel between the two qemu processes. UDP needs no listener, so either VM can
crash and boot again while the other keeps its end (a listen/connect socket netdev cannot reconnect).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from rcopylab import qmp
from rcopylab.config import HOSTS, LINK2_IPS, LINK_IPS, Config
from rcopylab.errors import LabError
from rcopylab.image import Image
from rcopy.sys.run import describe, run

DATA_DISKS = ("vdb", "vdc")


@dataclasses.dataclass(frozen=True)
class Vm:
    cfg: Config
    host: str
    image: Image

    @property
    def dir(self) -> Path:
        return self.cfg.vm_dir(self.host)

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qmp(self) -> Path:
        return self.cfg.sockets / f"{self.host}.qmp"

    def disk(self, name: str) -> Path:
        return self.dir / (f"{name}.img" if name in DATA_DISKS else f"{name}.qcow2")

    def create_disks(self) -> None:
        """Fresh root overlay and empty data disks (everything the VM wrote before is gone)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        root = self.disk("root")
        root.unlink(missing_ok=True)
        res = run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.image.root, "-F", "raw", root], timeout=60)
        if not res.ok:
            raise LabError(f"cannot create the root overlay of {self.host}: {describe(res)}")
        for name in DATA_DISKS:
            path = self.disk(name)
            path.unlink(missing_ok=True)
            with open(path, "wb") as f:
                f.truncate(self.cfg.disk_mb << 20)

    def argv(self) -> list[str]:
        n = HOSTS.index(self.host) + 1
        other = HOSTS[1 - HOSTS.index(self.host)]
        accel = ["-accel", "kvm", "-cpu", "host"] if self.cfg.accel == "kvm" else ["-accel", "tcg", "-cpu", self.cfg.cpu]
        cmdline = (f"console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0 quiet mitigations=off "
                   f"init=/usr/sbin/lab-init lab.host={self.host} lab.ip={LINK_IPS[self.host]} "
                   f"lab.ip2={LINK2_IPS[self.host]}")
        data = [a for name in DATA_DISKS for a in (
            "-drive", f"file={self.disk(name)},if=virtio,format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap")]
        return ["qemu-system-x86_64", "-name", f"rcopy-lab-{self.host}", "-nodefaults", *accel, "-smp", "1",
                "-m", str(self.cfg.mem_mb), "-display", "none", "-no-reboot",
                "-kernel", self.image.kernel, "-initrd", self.image.initrd, "-append", cmdline,
                "-drive", f"file={self.disk('root')},if=virtio,format=qcow2,cache=writeback", *data,
                "-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{self.cfg.ssh_port(self.host)}-:22",
                "-device", f"virtio-net-pci,netdev=mgmt,mac=52:54:00:00:00:0{n}",
                "-netdev", f"socket,id=repl,udp=127.0.0.1:{self.cfg.link_port(other)},"
                           f"localaddr=127.0.0.1:{self.cfg.link_port(self.host)}",
                "-device", f"virtio-net-pci,netdev=repl,mac=52:54:00:77:00:0{n}",
                "-netdev", f"socket,id=repl2,udp=127.0.0.1:{self.cfg.link_port(other, 2)},"
                           f"localaddr=127.0.0.1:{self.cfg.link_port(self.host, 2)}",
                "-device", f"virtio-net-pci,netdev=repl2,mac=52:54:00:78:00:0{n}",
                "-qmp", f"unix:{self.qmp},server=on,wait=off", "-serial", f"file:{self.console}",
                "-pidfile", self.pidfile, "-daemonize"]

    def boot(self) -> None:
        """Start qemu on the existing disks; returns at once (wait for ssh separately)."""
        if self.alive():
            return
        if not self.disk("root").exists():
            raise LabError(f"{self.host} has no disks: run 'scripts/lab up'")
        self.cfg.sockets.mkdir(parents=True, exist_ok=True)
        self.qmp.unlink(missing_ok=True)
        res = run(self.argv(), timeout=60)
        if not res.ok:
            raise LabError(f"qemu for {self.host} did not start: {describe(res)}")

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if b"rcopy-lab-" + self.host.encode() in cmd else None

    def alive(self) -> bool:
        return self.pid() is not None

    def crash(self) -> None:
        """Pull the power: SIGKILL qemu; what the guest had not flushed to the disks is lost."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10)
        self.pidfile.unlink(missing_ok=True)

    def quit(self) -> None:
        """Stop qemu cleanly (its caches flushed to the image files)."""
        pid = self.pid()
        if pid is None:
            return
        try:
            qmp.command(self.qmp, "quit")
        except LabError:
            pass
        if not self._wait_gone(pid, 20):
            self.crash()
        self.pidfile.unlink(missing_ok=True)

    def set_link(self, up: bool, n: int = 1) -> None:
        """Carrier of replication NIC ``n``; while down the guest sees NO-CARRIER and every frame is dropped."""
        qmp.command(self.qmp, "set_link", name="repl" if n == 1 else f"repl{n}", up=up)

    def hung_report(self, lines: int = 8) -> str:
        """What the console says about a hang: the kernel's hung-task reports ("blocked for more than
        120 seconds", seen once in a TCG lab with I/O stuck in flight), else the last lines."""
        try:
            text = self.console.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        hung = [l for l in text if "blocked for more than" in l or "hung_task" in l]
        return " | ".join((hung or text)[-lines:]) or "(empty console)"

    def console_tail(self, lines: int = 5) -> str:
        try:
            text = self.console.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no console log)"
        return " | ".join(text[-lines:]) or "(empty)"

    @staticmethod
    def _wait_gone(pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not Path(f"/proc/{pid}").exists()
