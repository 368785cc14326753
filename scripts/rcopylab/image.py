"""The lab's VM image: a Debian bookworm root filesystem, its kernel and initrd, and the lab ssh key.

Built by mmdebstrap (no VM, no mount: ``mke2fs -d`` turns the tree into an ext4 image) and cached under
``<cache>/<recipe hash>/`` so a rebuild happens only when recipe/ or this builder changes. VMs never
write the image: each boots a qcow2 overlay on it. Measured here: ~80 s cold, 0 s cached.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rcopylab.errors import LabError
from rcopy.sys.run import describe, run

RECIPE = Path(__file__).resolve().parent / "recipe"
ROOT_SIZE = "2G"   # sparse; the tree is ~450 MB
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")


@dataclasses.dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def key(self) -> Path:
        """Private half of the lab key: root in both VMs accepts it and uses it to reach the other VM."""
        return self.dir / "id_lab"

    def ready(self) -> bool:
        return (self.dir / "built").exists()


def recipe_hash() -> str:
    h = hashlib.sha256()
    for path in sorted([*RECIPE.rglob("*"), Path(__file__)]):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def lines(name: str) -> list[str]:
    """Non-comment lines of a recipe list file."""
    text = (RECIPE / name).read_text()
    return [w for w in (ln.split("#")[0].strip() for ln in text.splitlines()) if w]


def image_for(cache: Path) -> Image:
    return Image(cache / recipe_hash())


def build(cache: Path, log=print) -> Image:
    """Return the cached image for the current recipe, building it first if needed (one builder at a time)."""
    image = image_for(cache)
    if image.ready():
        log(f"lab: image {image.dir} is up to date (recipe {image.dir.name})")
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{image.dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image.ready():
            _build(image, log)
    return image


def _step(what: str, argv, log, timeout: float = 900.0, logfile: Path | None = None) -> None:
    t0 = time.monotonic()
    res = run(argv, timeout=timeout)
    if not res.ok:
        if logfile:
            logfile.write_text(res.stdout + res.stderr)
        raise LabError(f"image build failed while {what}: {describe(res)}" + (f" (full log: {logfile})" if logfile else ""))
    log(f"lab: {what}: {time.monotonic() - t0:.1f} s")


def _build(image: Image, log) -> None:
    t0 = time.monotonic()
    shutil.rmtree(image.dir, ignore_errors=True)
    image.dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="rcopy-lab-build-", dir=image.dir.parent) as tmp:
        tmp = Path(tmp)
        stage = tmp / "stage"
        _stage(stage, image, tmp, log)
        rootfs = tmp / "rootfs"
        _step("bootstrapping Debian (mmdebstrap)", [
            "mmdebstrap", "--variant=minbase", "--mode=root", "--include=" + ",".join(lines("packages")),
            *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDES],
            f"--customize-hook=sync-in {stage} /",
            "--customize-hook=chroot \"$1\" sh -c 'python3 -m pip install -q --no-index --no-deps"
            " --break-system-packages /tmp/lab-wheels/*.whl && rm -rf /tmp/lab-wheels'",
            # a 2 MB initrd instead of 22 MB: a few seconds off every boot under TCG
            "--customize-hook=chroot \"$1\" sh -c 'printf \"virtio_pci\\nvirtio_blk\\n\" >>/etc/initramfs-tools/modules"
            " && update-initramfs -u -k all >/dev/null'",
            "bookworm", rootfs], log, logfile=image.dir.parent / f"{image.dir.name}.failed.log")
        for src, dst in (("vmlinuz-*", image.kernel), ("initrd.img-*", image.initrd)):
            found = sorted((rootfs / "boot").glob(src))
            if not found:
                raise LabError(f"image build failed: no /boot/{src} in the bootstrapped tree")
            shutil.copy(found[-1], dst)
        _step("making the ext4 root image (mke2fs -d)",
              ["mke2fs", "-q", "-t", "ext4", "-L", "labroot", "-d", rootfs, "-F", image.root, ROOT_SIZE], log)
        shutil.rmtree(rootfs)
    (image.dir / "built").write_text(f"{time.time():.0f}\n")
    log(f"lab: image built in {time.monotonic() - t0:.0f} s: {image.dir}")


def _stage(stage: Path, image: Image, tmp: Path, log) -> None:
    """The files laid over the bootstrapped tree: init, ssh set-up, the host-built wheels."""
    _step("making the lab ssh key", ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rcopy-lab",
                                     "-f", image.key], log, timeout=60)
    ssh = stage / "root/.ssh"
    ssh.mkdir(parents=True, mode=0o700)
    shutil.copy(image.key, ssh / "id_ed25519")
    shutil.copy(image.key.with_suffix(".pub"), ssh / "authorized_keys")
    shutil.copy(RECIPE / "ssh_config", ssh / "config")
    for f in ssh.iterdir():
        f.chmod(0o600)
    sbin = stage / "usr/sbin"   # not sbin/: a directory in the stage would replace the merged-/usr symlink
    sbin.mkdir(parents=True)
    shutil.copy(RECIPE / "init", sbin / "lab-init")
    (sbin / "lab-init").chmod(0o755)
    initramfs = stage / "etc/initramfs-tools/conf.d"
    initramfs.mkdir(parents=True)
    shutil.copy(RECIPE / "initramfs/lab.conf", initramfs / "lab")
    network = stage / "etc/network"
    network.mkdir(parents=True)
    shutil.copy(RECIPE / "interfaces", network / "interfaces")
    sshd = stage / "etc/ssh/sshd_config.d"
    sshd.mkdir(parents=True)
    shutil.copy(RECIPE / "sshd.conf", sshd / "lab.conf")
    wheels = stage / "tmp/lab-wheels"
    wheels.mkdir(parents=True)
    _step("building host wheels " + " ".join(lines("wheels")),
          [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, *lines("wheels")], log)
