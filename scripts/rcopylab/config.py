"""Where a lab instance lives and what it is made of, from the environment.

RCOPY_LAB_DIR (default <repo>/.lab) selects an instance; its ports derive from a hash of that path, so two
instances (two helpers, two checkouts) run side by side. The image cache is shared by all instances.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]   # scripts/rcopylab/config.py -> the checkout
HOSTS = ("primary", "backup")
LINK_IPS = {"primary": "169.254.77.1", "backup": "169.254.77.2"}          # link 1
LINK2_IPS = {"primary": "169.254.78.1", "backup": "169.254.78.2"}         # link 2 (a second NIC pair)
LINKS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Config:
    dir: Path            # the instance: overlays, data disks, pidfiles, consoles
    sockets: Path        # QMP and ssh control sockets (short path: unix sockets allow ~100 bytes)
    cache: Path          # built images, keyed by recipe hash; survives a fresh clone
    accel: str           # tcg here (nested KVM did not boot a guest); kvm where it works
    cpu: str             # CPU model under TCG
    disk_mb: int         # size of each data disk
    mem_mb: int
    boot_timeout: float
    base_port: int

    def ssh_port(self, host: str) -> int:
        return self.base_port + HOSTS.index(host)

    def link_port(self, host: str, n: int = 1) -> int:
        """UDP port the host's end of replication link ``n`` (1 or 2) receives on."""
        return self.base_port + 2 * n + HOSTS.index(host)

    def vm_dir(self, host: str) -> Path:
        return self.dir / host


def load(env=os.environ) -> Config:
    inst = Path(env.get("RCOPY_LAB_DIR") or REPO / ".lab").resolve()
    tag = hashlib.sha256(str(inst).encode()).hexdigest()
    cache = Path(env.get("RCOPY_LAB_CACHE") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rcopy-lab")
    return Config(
        dir=inst,
        sockets=Path("/tmp") / f"rcopy-lab-{tag[:10]}",
        cache=cache,
        accel=env.get("RCOPY_LAB_ACCEL", "tcg"),
        cpu=env.get("RCOPY_LAB_CPU", "max"),
        disk_mb=int(env.get("RCOPY_LAB_DISK_MB", "512")),
        mem_mb=int(env.get("RCOPY_LAB_MEM_MB", "1024")),
        boot_timeout=float(env.get("RCOPY_LAB_BOOT_TIMEOUT", "240")),
        base_port=20000 + int(tag[:8], 16) % 4000 * 8,
    )
