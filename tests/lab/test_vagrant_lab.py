"""vagrant/Vagrantfile booted for real: scripts/vagrant-lab up, check, down under libvirt on this machine
(TCG, link-local networks), and a broken setting failing `up` with vagrant's own words.

These drive VMs of their own (libvirt domains), not the qemu lab's, so they take no `lab` fixture; the
time limits below are hang guards, not speed checks.
"""
import os
import subprocess

import pytest

from rcopylab.config import REPO
from rcopylab.vagrantlab import private_addresses

VAGRANT_LAB = REPO / "scripts" / "vagrant-lab"


def vagrant_lab(verb, timeout=1800, **env):
    return subprocess.run([VAGRANT_LAB, verb], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def domains():
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, timeout=60)
    return set(out.stdout.split())


def test_vagrant_lab_boots_both_vms_replicates_through_vagrant_ssh_and_destroys_them():
    try:
        up = vagrant_lab("up")
        assert up.returncode == 0, up.stderr[-3000:]
        assert "both VMs up and provisioned" in up.stderr
        assert domains() >= {"vagrant_primary", "vagrant_backup"}
        assert private_addresses() == []

        check = vagrant_lab("check")
        assert check.returncode == 0, check.stderr[-3000:]
        # what the primary printed through `vagrant ssh`: the initial sync, the delta, verify
        assert "group g: every secondary equals sync point 2" in check.stderr
        assert "thinvol: equal" in check.stderr and "thickvol: equal" in check.stderr
        assert "bytes sent (delta)" in check.stderr
        assert "rcopy-mgmt 169.254.121.1/24; rcopy-link 169.254.79.1/24" in check.stdout
        backup_view = check.stdout.split("backup's view:")[1]
        assert "role secondary" in backup_view and "sync point 2" in backup_view
        assert private_addresses() == []
    finally:
        down = vagrant_lab("down", timeout=600)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not domains() & {"vagrant_primary", "vagrant_backup"}


@pytest.mark.parametrize("setting, words", [
    ({"RCOPY_VAGRANT_BOX": "rcopy-test/no-such-box"},
     "The box 'rcopy-test/no-such-box' could not be found"),
    ({"RCOPY_VAGRANT_PROVIDER": "no-such-provider"},
     "The provider 'no-such-provider' could not be found"),
], ids=["box", "provider"])
def test_a_broken_vagrant_setting_fails_up_with_vagrants_message(tmp_path, setting, words):
    """Its own machine folder and domain prefix: it never touches the VMs of the test above."""
    res = vagrant_lab("up", timeout=900, VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
                      RCOPY_VAGRANT_PREFIX="rcopybroken_", **setting)
    assert res.returncode == 12, res.stderr[-3000:]
    assert words in res.stderr                    # vagrant's message, as it printed it
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("vagrant-lab: 'vagrant up --provider ") and "failed (exit 1)" in last
    assert words.split(" could")[0] in last       # and summed up on the one line that ends the run
    assert not any(d.startswith("rcopybroken_") for d in domains())
