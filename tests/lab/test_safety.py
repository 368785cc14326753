"""Refusals before any write (design §2.10) on real devices: filesystem, mounted, open by another
process, holders, wrong size, missing; a blank LV of the right size passes."""
import pytest

from tests.lab.dm_guest import run_guest

pytestmark = pytest.mark.lab

REFUSALS = """
import subprocess
from rcopy import safety
from rcopy.errors import RcopyError
SIZE = 8 << 20
def verdict(path, **kw):
    try:
        safety.check_writable(path, **kw)
        return ["ok", 0, ""]
    except RcopyError as e:
        return [type(e).__name__, e.exit_code, str(e)]
blank = thick_volume("blank", 8)
fs = thick_volume("fs", 8)
sh("mkfs.ext4", "-q", fs)
OUT["blank"] = verdict(blank, expected_size=SIZE)
OUT["filesystem"] = verdict(fs, expected_size=SIZE)
OUT["forced"] = verdict(fs, expected_size=SIZE, force=True)
os.makedirs("/mnt/rcopytest", exist_ok=True)
sh("mount", fs, "/mnt/rcopytest")
try:
    OUT["mounted"] = verdict(fs)
finally:
    sh("umount", "/mnt/rcopytest")
holder = subprocess.Popen(["sleep", "120"], stdin=open(blank, "rb"))
try:
    OUT["open"] = verdict(blank)
finally:
    holder.kill(); holder.wait()
OUT["holders"] = verdict(PV)
OUT["wrong_size"] = verdict(blank, expected_size=SIZE // 2)
OUT["too_small"] = verdict(blank, expected_size=SIZE * 2, force=True)
OUT["missing"] = verdict(f"/dev/{VG}/nope")
OUT["blank_again"] = verdict(blank, expected_size=SIZE)
"""


def test_refusals(clean_lab):
    out = run_guest(clean_lab, REFUSALS)
    assert out["blank"][0] == "ok" and out["blank_again"][0] == "ok" and out["forced"][0] == "ok"
    for case, word in [("filesystem", "ext4"), ("mounted", "mounted on /mnt/rcopytest"),
                       ("open", "open by process"), ("holders", "holders"), ("wrong_size", "size")]:
        kind, code, msg = out[case]
        assert (kind, code) == ("DeviceUnsafe", 6), (case, out[case])
        assert word in msg and "--force" in msg and "\\n" not in msg, (case, msg)
    assert out["too_small"][:2] == ["TooSmall", 5]
    assert out["missing"][:2] == ["NotFound", 3]
