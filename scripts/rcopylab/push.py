"""Ship the current working tree's rcopy into running VMs, without rebuilding the image.

The wheel is built from a copy of the tree (so the build never races other work in the checkout's
build/ folder), with the host's setuptools and cffi (the cffi module is compiled for the limited API,
so the guest's Python 3.11 loads it), then unpacked in each guest by guest/install_wheel.py (pip itself takes ~30 s under TCG): ``rcopy``
lands on root's PATH.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from rcopylab.config import REPO
from rcopylab.errors import LabError
from rcopy.sys.run import describe, run

TREE = ("rcopy", "native", "pyproject.toml", "setup.py", "README.md", "LICENSE")
INSTALLER = Path(__file__).resolve().parent / "guest" / "install_wheel.py"
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "_native.c", "*.egg-info", "build")


def build_wheel(out: Path) -> Path:
    """Build rcopy's wheel from the working tree into out; return its path."""
    with tempfile.TemporaryDirectory(prefix="rcopy-lab-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in TREE:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=JUNK)
            elif path.exists():
                shutil.copy(path, src / name)
        shutil.rmtree(out, ignore_errors=True)
        res = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                   "-w", out, src], timeout=300)
        if not res.ok:
            raise LabError(f"cannot build the rcopy wheel from {REPO}: {describe(res)}")
    wheels = sorted(out.glob("rcopy-*.whl"))
    if not wheels:
        raise LabError(f"pip built no rcopy wheel in {out}")
    return wheels[-1]


def install(ssh, wheel: Path) -> str:
    """Install the wheel in the VM behind ssh; return what `rcopy --version` says there."""
    remote = f"/tmp/{wheel.name}"
    ssh.run(f"cat > {remote}", input=wheel.read_bytes(), timeout=120)
    ssh.run(f"python3 - {remote}", input=INSTALLER.read_text(), timeout=300)
    res = ssh.run(f"rm -f {remote} && rcopy --version", timeout=120)
    return res.stdout.strip()
