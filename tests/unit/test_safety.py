"""Device checks before writing, on regular files and fake /proc data (no kernel features needed)."""
import os
import shutil
import subprocess

import pytest

from rcopy import safety
from rcopy.errors import DeviceUnsafe, NotFound


@pytest.fixture
def blank(tmp_path):
    p = tmp_path / "blank.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    return str(p)


def test_blank_file_is_writable(blank):
    assert safety.check_writable(blank, expected_size=8 << 20).size == 8 << 20


def test_missing_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        safety.check_writable(str(tmp_path / "nope"))


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs e2fsprogs")
def test_filesystem_refused_unless_forced(blank):
    subprocess.run(["mkfs.ext4", "-q", "-F", blank], check=True)
    with pytest.raises(DeviceUnsafe, match=r"refusing to overwrite .*ext4 \(filesystem\).*--force"):
        safety.check_writable(blank)
    assert safety.check_writable(blank, force=True)


def test_wrong_size(blank):
    with pytest.raises(DeviceUnsafe, match="size"):
        safety.check_writable(blank, expected_size=4 << 20)
    assert safety.check_writable(blank, expected_size=4 << 20, force=True)
    with pytest.raises(safety.TooSmall):
        safety.check_writable(blank, expected_size=16 << 20, force=True)


def test_mounts_of_reads_mountinfo(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text("22 1 254:1 / / rw,relatime - ext4 /dev/vda rw\n"
                  "40 22 253:3 / /mnt/data rw - xfs /dev/mapper/vg0-data rw\n")
    assert safety.mounts_of("253:3", str(mi)) == ["/mnt/data"]
    assert safety.mounts_of("253:4", str(mi)) == []


def test_openers_of_scans_proc_fds(tmp_path):
    """A fake /proc whose process 4242 holds the block device: found; our own pid is skipped."""
    blk = next((p for p in ("/dev/vda", "/dev/sda", "/dev/loop0") if os.path.exists(p)), None)
    if blk is None:
        pytest.skip("no block device node on this host")
    for pid in ("4242", str(os.getpid())):
        (tmp_path / pid / "fd").mkdir(parents=True)
        os.symlink(blk, tmp_path / pid / "fd" / "3")
    (tmp_path / "77" / "fd").mkdir(parents=True)
    os.symlink(os.devnull, tmp_path / "77" / "fd" / "0")
    assert safety.openers_of(os.stat(blk).st_rdev, str(tmp_path)) == [4242]
