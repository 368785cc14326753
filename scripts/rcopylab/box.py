"""A libvirt Vagrant box made from the lab image, for a machine that cannot download one.

A libvirt box is a tar of a qcow2 disk, ``metadata.json`` and a Vagrantfile of defaults. This one also
carries the lab image's kernel and initrd (the image's root filesystem has no boot loader: libvirt boots
the kernel directly, as scripts/lab does) and the lab's root key, which Vagrant logs in with. Its init
(recipe/init) sees no ``lab.host`` on the command line and boots as a Vagrant guest: DHCP on the
management NIC, the rest from what Vagrant writes. Cached beside the image, named after its recipe hash,
so a recipe change makes a new box and an unchanged one is never rebuilt.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path

from rcopylab.errors import LabError
from rcopylab.image import Image
from rcopy.sys.run import describe, run

BOX_VAGRANTFILE = """\
# Defaults of the rcopy lab box (made by scripts/vagrant-lab from the scripts/lab image).
Vagrant.configure("2") do |config|
  config.ssh.username = "root"
  config.ssh.private_key_path = File.join(__dir__, "id_lab")
  config.ssh.insert_key = false
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0 quiet mitigations=off init=/usr/sbin/lab-init"
  end
end
"""


def name(image: Image) -> str:
    return f"rcopy-lab-{image.dir.name}"


def build(image: Image, out: Path, log=print) -> Path:
    """Write the box file for image into out (once per image); return its path."""
    box = out / f"{name(image)}.box"
    if box.exists():
        return box
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f"{name(image)}.stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    res = run(["qemu-img", "convert", "-q", "-O", "qcow2", image.root, stage / "box.img"], timeout=600)
    if not res.ok:
        raise LabError(f"cannot convert {image.root} into the box's disk: {describe(res)}")
    for src in (image.kernel, image.initrd, image.key):
        shutil.copy(src, stage / src.name)
    size_gib = -(-image.root.stat().st_size // (1 << 30))
    (stage / "metadata.json").write_text(json.dumps({"provider": "libvirt", "format": "qcow2",
                                                     "virtual_size": size_gib}) + "\n")
    (stage / "Vagrantfile").write_text(BOX_VAGRANTFILE)
    partial = box.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        for f in sorted(stage.iterdir()):
            tar.add(f, arcname=f.name)
    partial.rename(box)
    shutil.rmtree(stage)
    log(f"vagrant-lab: box {box.name} made in {time.monotonic() - t0:.0f} s")
    return box
