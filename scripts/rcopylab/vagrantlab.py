"""scripts/vagrant-lab: vagrant/Vagrantfile booted for real, under libvirt on this machine.

This machine has no usable KVM and no systemd, and its traffic must stay on loopback and link-local
addresses. So ``up`` installs Debian's vagrant, vagrant-libvirt and libvirt's daemon *without*
libvirt-daemon-system (which would bring systemd and libvirt's ``default`` NAT network in a private
range), starts libvirtd by hand with guests run as root under TCG (domain type ``qemu``), builds a box
from the lab image (rcopylab.box) and runs ``vagrant up`` with the settings the Vagrantfile reads from
the environment: the box, the management network and the private link in 169.254.0.0/16, both isolated.
Vagrant never calls out: its version check and box catalogue are off or pointed at a closed local port.
``check`` replicates a volume through ``vagrant ssh``; ``down`` destroys both VMs.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

from rcopylab import box as boxes
from rcopylab import image as images
from rcopylab import push
from rcopylab.config import REPO, load
from rcopylab.errors import LabError, LabUsage, one_line
from rcopylab.replication_demo import lvm_setup
from rcopy.sys.run import describe, run

VAGRANT_DIR = REPO / "vagrant"
WHEEL_DIR = VAGRANT_DIR / ".wheel"            # rsynced to /rcopy/vagrant/.wheel; provision.sh installs it
URI = "qemu:///system"
LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")
PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
PACKAGES = ("vagrant", "vagrant-libvirt", "libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
            "dnsmasq-base", "iptables", "qemu-system-x86", "qemu-utils", "rsync", "openssh-client")
# What libvirtd's QEMU driver needs when libvirt-daemon-system is not installed: its compiled-in user and
# group must exist even though guests run as root; no virtlogd, no cgroups or namespaces (no systemd).
QEMU_CONF = """\
# written by rcopy's scripts/vagrant-lab (libvirt-daemon-system is not installed): guests run as root
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
"""
UP_TIMEOUT = 1800.0          # a hang guard only: both VMs boot and provision in ~2 min under TCG
CHECK_TIMEOUT = 900.0
CHECK_VG, CHECK_MIB = "rcopytest", 32


def settings(env=os.environ) -> dict[str, str]:
    """The environment vagrant runs with here; a variable the caller set wins."""
    s = {
        "VAGRANT_CHECKPOINT_DISABLE": "1",            # no version check over the network
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        "VAGRANT_SERVER_URL": "http://127.0.0.1:9",   # a box not found locally fails at once, never downloads
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "RCOPY_VAGRANT_PROVIDER": "libvirt",
        "RCOPY_VAGRANT_LINK_IPS": "169.254.79.77,169.254.79.78",
        "RCOPY_VAGRANT_MGMT_NET": "169.254.121.0/24",
        "RCOPY_VAGRANT_DRIVER": "kvm" if env.get("RCOPY_LAB_ACCEL") == "kvm" else "qemu",
        "RCOPY_VAGRANT_CONSOLE": str(VAGRANT_DIR / ".vagrant" / "consoles"),
        "LIBVIRT_DEFAULT_URI": URI,
    }
    s.update({k: env[k] for k in s if k in env})
    for key in ("RCOPY_VAGRANT_LINK_IPS", "RCOPY_VAGRANT_MGMT_NET"):
        for part in s[key].split(","):
            addr = ipaddress.ip_network(part.strip(), strict=False)
            if not addr.subnet_of(LINK_LOCAL):
                raise VagrantLabUsage(f"{key}={s[key]} is outside 169.254.0.0/16: this lab's traffic stays link-local")
    return s


class VagrantLabError(LabError):
    """vagrant-lab: {msg}"""


class VagrantLabUsage(LabUsage):
    """vagrant-lab: {msg}"""


class VagrantFailed(VagrantLabError):
    """vagrant-lab: 'vagrant {args}' failed (exit {rc}): {last}"""


class VagrantLab:
    def __init__(self, log=print):
        self.log = log
        os.environ.update(settings())
        self.cfg = load()
        self.user_box = os.environ.get("RCOPY_VAGRANT_BOX")
        # what the Vagrantfile reads, in every verb: the user's box, else the current lab image's
        os.environ["RCOPY_VAGRANT_BOX"] = self.user_box or boxes.name(images.image_for(self.cfg.cache))
        self.domains = [os.environ.get("RCOPY_VAGRANT_PREFIX", "vagrant_") + h for h in ("primary", "backup")]

    # --- host set-up ---------------------------------------------------------------------------------
    def install(self) -> None:
        """Install the Debian packages that are missing (none: nothing runs)."""
        missing = [p for p in PACKAGES if not _installed(p)]
        if not missing:
            return
        t0 = time.monotonic()
        self.log(f"vagrant-lab: installing {' '.join(missing)}")
        for argv in (["apt-get", "update", "-q"], ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                                                    "--no-install-recommends", *missing]):
            res = run(["env", "DEBIAN_FRONTEND=noninteractive", *argv], timeout=900)
            if not res.ok:
                raise VagrantLabError(f"cannot install {' '.join(missing)}: {describe(res)}")
        self.log(f"vagrant-lab: packages installed in {time.monotonic() - t0:.0f} s")

    def libvirtd(self) -> None:
        """Make sure a libvirtd answers on qemu:///system, starting one by hand if none does."""
        if run(["virsh", "-c", URI, "version"], timeout=30).ok:
            return
        for d in ("/var/log/libvirt", "/var/lib/libvirt/images", "/run/libvirt"):
            Path(d).mkdir(parents=True, exist_ok=True)
        conf = Path("/etc/libvirt/qemu.conf")
        if not conf.exists():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(QEMU_CONF)
        for group in ("kvm", "libvirt-qemu"):
            if not run(["getent", "group", group], timeout=30).ok:
                run(["groupadd", "-r", group], timeout=30, check=True, error=VagrantLabError)
        if not run(["getent", "passwd", "libvirt-qemu"], timeout=30).ok:
            run(["useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin",
                 "libvirt-qemu"], timeout=30, check=True, error=VagrantLabError)
        # its own session and no pipe of ours: a daemon holding our stdout would keep a caller waiting
        rc = subprocess.run(["libvirtd", "--daemon"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, timeout=60).returncode
        if rc != 0:
            raise VagrantLabError(f"libvirtd did not start (exit {rc}): see /var/log/libvirt/libvirtd.log")
        for _ in range(60):
            if run(["virsh", "-c", URI, "version"], timeout=30).ok:
                self.log("vagrant-lab: libvirtd started")
                return
            time.sleep(0.5)
        raise VagrantLabError("libvirtd started but does not answer on qemu:///system (see /var/log/libvirt/libvirtd.log)")

    def box(self) -> str:
        """The box to boot: the user's RCOPY_VAGRANT_BOX as given, else the lab image's, added once."""
        if self.user_box:
            return self.user_box
        image = images.build(self.cfg.cache, self.log)
        name = boxes.name(image)
        listed = vagrant("box", "list", "--machine-readable", capture=True)
        if f",box-name,{name}\n" not in listed + "\n":
            path = boxes.build(image, self.cfg.cache / "vagrant", self.log)
            vagrant("box", "add", "--force", "--name", name, str(path), capture=True)
            self.log(f"vagrant-lab: box {name} added")
            for old in re.findall(r",box-name,(rcopy-lab-[0-9a-f]+)$", listed, re.M):
                if old != name:   # an older recipe's; vagrant refuses (and keeps it) while a VM uses it
                    self.forget_box(old)
        return name

    def forget_box(self, name: str) -> None:
        """Remove a box and the copy vagrant-libvirt uploaded of it into libvirt's default pool."""
        try:
            vagrant("box", "remove", "--all", name, capture=True)
        except VagrantFailed as e:
            self.log(f"vagrant-lab: kept the old box {name}: {e}")
            return
        listing = run(["virsh", "-c", URI, "vol-list", "default"], timeout=30).stdout.splitlines()[2:]
        for vol in (line.split()[0] for line in listing if line.strip()):
            if vol.startswith(f"{name}_vagrant_box_image"):
                run(["virsh", "-c", URI, "vol-delete", vol, "--pool", "default"], timeout=60)

    # --- verbs -------------------------------------------------------------------------------------
    def up(self) -> None:
        t0 = time.monotonic()
        self.cfg.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cfg.cache / "vagrant-host.lock", "w") as lock:   # one set-up of the host at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.install()
            self.libvirtd()
            name = self.box()
        push.build_wheel(WHEEL_DIR)
        (VAGRANT_DIR / ".vagrant" / "consoles").mkdir(parents=True, exist_ok=True)
        self.log(f"vagrant-lab: set-up {time.monotonic() - t0:.0f} s; vagrant up (box {name}, "
                 f"provider {os.environ['RCOPY_VAGRANT_PROVIDER']})")
        t1 = time.monotonic()
        vagrant("up", "--provider", os.environ["RCOPY_VAGRANT_PROVIDER"], timeout=UP_TIMEOUT)
        self.log(f"vagrant-lab: both VMs up and provisioned in {time.monotonic() - t1:.0f} s "
                 f"({time.monotonic() - t0:.0f} s in all)")
        self.networks()

    def networks(self) -> list[str]:
        """The libvirt networks the VMs are attached to, each with its addresses; refuse any that is not
        link-local (this machine's rule: no private-range address may appear on it)."""
        seen = []
        for dom in self.domains:
            res = run(["virsh", "-c", URI, "domiflist", dom], timeout=30, check=True, error=VagrantLabError)
            for line in res.stdout.splitlines()[2:]:
                cols = line.split()
                if len(cols) >= 3 and cols[1] == "network" and cols[2] not in seen:
                    seen.append(cols[2])
        out = []
        for net in seen:
            xml = run(["virsh", "-c", URI, "net-dumpxml", net], timeout=30, check=True, error=VagrantLabError).stdout
            addrs = [ipaddress.ip_interface(f"{ip.get('address')}/{ip.get('prefix') or ip.get('netmask')}")
                     for ip in ElementTree.fromstring(xml).iter("ip")]
            for a in addrs:
                if a.ip not in LINK_LOCAL:
                    raise VagrantLabError(f"libvirt network {net} has address {a}, outside 169.254.0.0/16; "
                                   f"destroy the VMs ('scripts/vagrant-lab down') and the network "
                                   f"('virsh net-destroy {net}; virsh net-undefine {net}')")
            out.append(f"{net} {', '.join(map(str, addrs)) or '(no address)'}")
        private = private_addresses()
        if private:
            raise VagrantLabError(f"this machine has private-range addresses ({', '.join(private)}): "
                           "nothing of this lab may put one there; find what did and remove it")
        self.log("vagrant-lab: the VMs' networks: " + "; ".join(out) + "; no private-range address on this machine")
        return out

    def check(self) -> None:
        """Replicate a thin and a thick volume from primary to backup through `vagrant ssh`, and say what
        that proved. Starts from clean data disks and no rcopy state, so it can run again."""
        t0 = time.monotonic()
        reset = "sudo bash /rcopy/scripts/rcopylab/guest/reset.sh"
        for host in ("backup", "primary"):
            self.ssh(host, f"{reset} && sudo bash -c {shlex.quote(lvm_setup(CHECK_VG, CHECK_MIB, 96))}")
        agent = "ssh -o BatchMode=yes -o ConnectTimeout=10 root@{link} rcopy agent"
        vols = ("thinvol", "thickvol")
        fill = "; ".join(f"dd if=/dev/urandom of=/dev/{CHECK_VG}/{v} bs=1M count=4 oflag=direct status=none"
                         for v in vols)
        write = "; ".join(f"dd if=/dev/urandom of=/dev/{CHECK_VG}/{v} bs=4k count=8 seek={9 + i * 100} "
                          f"oflag=direct conv=notrunc status=none" for i, v in enumerate(vols))
        link_ip = os.environ["RCOPY_VAGRANT_LINK_IPS"].split(",")[1].strip()
        steps = [
            f"getent hosts backup | grep -q '^{link_ip} '   # backup's name is its private-link address",
            fill,
            f"rcopy target create backup --link backup --agent {shlex.quote(agent)}",
            "rcopy group create g --target backup",
            *[f"rcopy group admit g /dev/{CHECK_VG}/{v} backup:/dev/{CHECK_VG}/{v}" for v in vols],
            "rcopy group start g --wait",
            write,
            "rcopy sync g --wait",
            "rcopy verify g",
            "rcopy status",
        ]
        script = "set -e\n" + "\n".join(f"echo {shlex.quote('+ ' + s.split(';')[0])}\n{s}" for s in steps)
        self.ssh("primary", f"sudo bash -c {shlex.quote(script)}")   # set -e: a failed step fails it
        backup = self.ssh("backup", "sudo rcopy status")
        nets = self.networks()
        self.log(f"vagrant-lab: check passed in {time.monotonic() - t0:.0f} s")
        print("vagrant-lab check proved, through 'vagrant ssh' on the Vagrantfile's two VMs "
              f"(box {os.environ['RCOPY_VAGRANT_BOX']}, libvirt driver "
              f"{os.environ['RCOPY_VAGRANT_DRIVER']}):")
        print(f"  - primary reaches backup by name on the private link ({link_ip}): the agent ran over ssh root@backup")
        print(f"  - a thin and a thick volume ({CHECK_MIB} MiB each) were admitted, fully synced, written and "
              "delta-synced")
        print("  - 'rcopy verify g' found each secondary equal to the last sync point")
        print("  - the networks they use are link-local: " + "; ".join(nets))
        print("  backup's view:\n" + "\n".join("    " + ln for ln in backup.strip().splitlines()))

    def down(self) -> None:
        if not self.machines():
            self.log("vagrant-lab: no VMs to destroy")
            return
        self.libvirtd()        # a VM of ours may outlive the libvirtd that started it
        vagrant("destroy", "-f", timeout=600)

    def machines(self) -> list[str]:
        """The VMs vagrant has created here (an id in its machine folder), destroyed or not."""
        dot = Path(os.environ.get("VAGRANT_DOTFILE_PATH") or VAGRANT_DIR / ".vagrant")
        return sorted(f.parent.parent.name for f in (dot / "machines").glob("*/*/id") if f.read_text().strip())

    # --- helpers -------------------------------------------------------------------------------------
    def ssh(self, host: str, cmd: str) -> str:
        return vagrant("ssh", host, "-c", cmd, timeout=CHECK_TIMEOUT)


def vagrant(*args: str, timeout: float = 600.0, capture: bool = False) -> str:
    """Run vagrant in vagrant/, its output passed through (progress bars dropped) and kept; on failure
    raise with vagrant's own last lines. Its own process group, killed whole (ruby, its ssh) by a
    watchdog if it has not ended after timeout: a hang guard that does not depend on output."""
    argv = ["vagrant", *args, *([] if args[0] in ("box", "ssh") else ["--no-color"])]
    proc = subprocess.Popen(argv, cwd=VAGRANT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    fired = threading.Event()

    def kill():
        fired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip().rsplit("\r", 1)[-1].replace("\x1b[K", "")
            if "Progress:" in line:
                continue
            lines.append(line)
            if not capture:
                print(line, file=sys.stderr, flush=True)
        rc = proc.wait()
    finally:
        watchdog.cancel()
    shown = " ".join(args[:2] if args[0] == "ssh" else args)
    if fired.is_set():
        raise VagrantFailed(args=shown, rc="killed", last=f"no end after {timeout:.0f} s; its last words: "
                                                          f"{_last(lines)}")
    if rc != 0:
        if capture:
            print("\n".join(lines), file=sys.stderr)
        raise VagrantFailed(args=shown, rc=rc, last=_last(lines))
    return "\n".join(lines)


def _installed(pkg: str) -> bool:
    res = run(["dpkg-query", "-W", "-f=${Status}", pkg], timeout=30)
    return res.ok and res.stdout.strip().endswith(" installed")


def private_addresses() -> list[str]:
    """Every IPv4 address in 10/8, 172.16/12 or 192.168/16 on this machine's interfaces, with its device."""
    res = run(["ip", "-o", "-4", "addr", "show"], timeout=30, check=True, error=VagrantLabError)
    found = []
    for line in res.stdout.splitlines():
        words = line.split()
        addr = ipaddress.ip_interface(words[3])
        if any(addr.ip in net for net in PRIVATE):
            found.append(f"{addr} on {words[1]}")
    return found


def _last(lines: list[str]) -> str:
    """Vagrant's message: its last two paragraphs on one line (an error of vagrant's spans a few lines)."""
    paras, cur = [], []
    for ln in [*lines, ""]:
        if ln.strip():
            cur.append(ln.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    return " ".join(paras[-2:])[-600:] if paras else "(no output)"


USAGE = """scripts/vagrant-lab VERB   (vagrant/Vagrantfile under libvirt on this machine, TCG, link-local networks)
  up       install vagrant, vagrant-libvirt and libvirtd if missing, start libvirtd, build and add the
           box from the lab image (cached by recipe hash), vagrant up both VMs
  check    replicate a thin and a thick volume primary -> backup through 'vagrant ssh'; say what it proved
  down     destroy both VMs
Environment: RCOPY_VAGRANT_BOX (a box of yours instead of the lab's), RCOPY_VAGRANT_PROVIDER (libvirt),
RCOPY_VAGRANT_LINK_IPS, RCOPY_VAGRANT_MGMT_NET (both within 169.254.0.0/16), RCOPY_LAB_ACCEL=kvm."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2

    def verb() -> int:
        if len(argv) != 1 or argv[0] not in ("up", "check", "down"):
            raise VagrantLabUsage(f"unknown or extra words {' '.join(argv)!r} (see 'scripts/vagrant-lab --help')")
        getattr(VagrantLab(log=log), argv[0])()
        return 0

    return one_line("vagrant-lab", verb)


if __name__ == "__main__":
    sys.exit(main())
