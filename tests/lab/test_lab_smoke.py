"""The lab itself, on a real kernel: what issue 2 says it must show before anything is built on it.

The scenario lives in scripts/rcopylab/smoke.py (scripts/demo narrates the same steps); here each step is
asserted, plus the Vagrant description of the same lab, which cannot boot here but is checked beyond its syntax.
"""
import json
import subprocess

import pytest

import rcopy
from rcopylab import smoke
from rcopylab.config import HOSTS, REPO

pytestmark = pytest.mark.lab


def test_thin_and_thick_snapshots_keep_the_data_of_their_instant(clean_lab):
    shown = smoke.snapshots(clean_lab)
    f = shown.facts
    for kind in ("thin", "thick"):
        assert (f[f"{kind}.0"], f[f"{kind}.4"]) == (f["B"], f["C"]), f"{kind} origin lost writes made after the snapshot"
        assert (f[f"{kind}_snap.0"], f[f"{kind}_snap.4"]) == (f["A"], f["ZERO"]), f"{kind} snapshot changed with its origin"
    assert {"thin-pool", "thin", "snapshot-origin", "snapshot"} <= set(f["targets"].split())
    assert shown.ok


def test_nbd_writes_from_primary_land_on_the_backup_lv(clean_lab):
    smoke.export(clean_lab)
    shown = smoke.nbd_write(clean_lab)
    assert shown.facts["sent"] == shown.facts["held"]


def test_link_down_fails_nbd_io_and_link_up_allows_a_new_connection(clean_lab):
    smoke.export(clean_lab)
    shown = smoke.link_cut(clean_lab)
    assert shown.facts["write_while_down_rc"] != 0, "a write over NBD succeeded with the link down"
    assert shown.facts["sent"] == shown.facts["held"], "data sent after link up did not arrive intact"


def test_crash_and_start_keep_the_backups_lvs_and_their_data(clean_lab):
    shown = smoke.crash_start(clean_lab)
    before, after = shown.facts["before"], shown.facts["after"]
    assert shown.facts["killed"]
    assert after["boot"] != before["boot"], "backup did not reboot"
    assert "thin active" in after["lvs"] and "thick active" in after["lvs"]
    assert after["lvs"] == before["lvs"]
    assert (after["thin"], after["thick"]) == (before["thin"], before["thick"])


def test_vms_reach_each_other_by_name_and_run_the_working_trees_rcopy(clean_lab):
    shown = smoke.peers(clean_lab, rcopy.__version__)
    assert shown.facts["primary"] == {"peer": "backup", "version": f"rcopy {rcopy.__version__}"}
    assert shown.facts["backup"] == {"peer": "primary", "version": f"rcopy {rcopy.__version__}"}


def test_scripts_lab_run_exits_with_the_commands_status(lab):
    cp = subprocess.run([REPO / "scripts/lab", "run", "backup", "--", "sh", "-c", "echo out; exit 3"],
                        capture_output=True, text=True, timeout=120)
    assert (cp.returncode, cp.stdout) == (3, "out\n")


@pytest.mark.parametrize("argv, words", [
    (["bogus"], "unknown verb 'bogus'"),
    (["run", "nosuch", "--", "true"], "no VM named 'nosuch'"),
    (["link", "sideways"], "usage: scripts/lab link down|up [1|2]"),
])
def test_scripts_lab_refuses_bad_input_in_one_line(tmp_path, argv, words):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RCOPY_LAB_DIR": str(tmp_path / "lab")}
    cp = subprocess.run([REPO / "scripts/lab", *argv], capture_output=True, text=True, timeout=60, env=env)
    assert (cp.returncode, cp.stdout) == (2, "")
    assert words in cp.stderr and len(cp.stderr.strip().splitlines()) == 1


def _vagrant_settings(tmp_path, **env):
    vagrant = REPO / "vagrant"
    syntax = subprocess.run(["ruby", "-c", vagrant / "Vagrantfile"], capture_output=True, text=True, timeout=60)
    assert syntax.stdout.strip() == "Syntax OK", syntax.stderr
    assert subprocess.run(["bash", "-n", vagrant / "provision.sh"], timeout=60).returncode == 0
    out = subprocess.run(["ruby", vagrant / "check.rb", vagrant / "Vagrantfile"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "RCOPY_LAB_KEY_DIR": str(tmp_path), **env},
                         check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_vagrantfile_takes_this_machines_settings_from_the_environment(tmp_path):
    """What scripts/vagrant-lab sets (rcopylab.vagrantlab.settings) reaches every VM's libvirt settings."""
    from rcopylab.vagrantlab import settings
    env = {k: v for k, v in settings({}).items() if k.startswith("RCOPY_")}
    events = _vagrant_settings(tmp_path, **env, RCOPY_VAGRANT_BOX="rcopy-lab-test", RCOPY_VAGRANT_PREFIX="t_")
    assert [e["args"] for e in events if e["call"] == "box="] == [["rcopy-lab-test"]]
    for host, ip in zip(HOSTS, env["RCOPY_VAGRANT_LINK_IPS"].split(",")):
        mine = {e["call"]: e for e in events if f"define:{host}" in e["scope"]}
        lv = {c: e["args"][0] for c, e in mine.items() if c.endswith("=") and "provider:libvirt" in e["scope"]}
        assert lv["driver="] == "qemu" and lv["cpu_mode="] == "maximum" and lv["default_prefix="] == "t_"
        assert lv["management_network_address="] == "169.254.121.0/24"
        assert lv["management_network_mode="] == "none"
        net = mine["network"]["kw"]
        assert (net["ip"], net["libvirt__forward_mode"]) == (ip, "none")
        assert mine["serial"]["kw"]["source"]["path"].endswith(f"consoles/{host}.log")


def test_vagrantfile_describes_the_same_two_vms(tmp_path):
    events = _vagrant_settings(tmp_path)
    assert [e["args"][0] for e in events if e["call"] == "define"] == list(HOSTS)
    addrs = {}
    for host in HOSTS:
        mine = [e for e in events if f"define:{host}" in e["scope"]]
        disks = [(e["kw"]["device"], e["kw"]["size"]) for e in mine if e["call"] == "storage"]
        assert disks == [("vdb", "512M"), ("vdc", "512M")]
        nets = [e["kw"]["ip"] for e in mine if e["call"] == "network" and e["args"] == ["private_network"]]
        assert len(nets) == 1
        addrs[host] = nets[0]
        shell = {e["args"][0]: e["kw"]["args"] for e in mine if e["call"] == "provision" and e["kw"]["type"] == "shell"}
        assert shell["rcopy"] == ["rcopy"]
        assert shell["system"][:2] == ["system", host]
    for host in HOSTS:   # each VM learns both names, at the addresses of their private network
        shell = {e["args"][0]: e["kw"].get("args") for e in events
                 if e["call"] == "provision" and f"define:{host}" in e["scope"]}
        assert dict(zip(shell["system"][2::2], shell["system"][3::2])) == addrs
    assert ["..", "/rcopy"] in [e["args"] for e in events if e["call"] == "synced_folder"]
    assert "recipe=/rcopy/scripts/rcopylab/recipe" in (REPO / "vagrant/provision.sh").read_text()
    assert (tmp_path / "id_lab").exists() and (tmp_path / "id_lab.pub").exists()


def test_a_command_that_never_answers_is_reported_as_a_hung_guest(lab):
    """A hung guest (I/O stuck in flight, seen once under TCG) must fail a run at once with the console's
    words, counted apart from rcopy's own failures: a GuestHung, not a test timeout."""
    from rcopylab.errors import GuestHung
    with pytest.raises(GuestHung) as e:
        lab.run("primary", "sleep 60", timeout=3)
    assert "looks hung" in str(e.value) and "console:" in str(e.value)
