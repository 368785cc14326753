"""scripts/vagrant-lab's settings and messages, without vagrant or libvirt (rcopylab.vagrantlab)."""
import os

import pytest

from rcopylab import vagrantlab
from rcopylab.vagrantlab import VagrantLabUsage as LabUsage


def test_settings_keep_every_network_link_local_and_vagrant_off_the_network():
    s = vagrantlab.settings({})
    assert s["RCOPY_VAGRANT_MGMT_NET"] == "169.254.121.0/24"
    assert s["RCOPY_VAGRANT_LINK_IPS"] == "169.254.79.77,169.254.79.78"
    assert s["VAGRANT_CHECKPOINT_DISABLE"] == "1"
    assert s["VAGRANT_SERVER_URL"].startswith("http://127.0.0.1:")   # a box it lacks fails, never downloads
    assert s["RCOPY_VAGRANT_DRIVER"] == "qemu"
    assert vagrantlab.settings({"RCOPY_LAB_ACCEL": "kvm"})["RCOPY_VAGRANT_DRIVER"] == "kvm"
    mine = vagrantlab.settings({"RCOPY_VAGRANT_LINK_IPS": "169.254.90.7,169.254.90.8"})
    assert mine["RCOPY_VAGRANT_LINK_IPS"] == "169.254.90.7,169.254.90.8"


@pytest.mark.parametrize("key, value", [
    ("RCOPY_VAGRANT_MGMT_NET", "198.51.100.0/24"),
    ("RCOPY_VAGRANT_LINK_IPS", "169.254.79.77,198.51.100.8"),
])
def test_settings_refuse_an_address_outside_link_local(key, value):
    with pytest.raises(LabUsage) as e:
        vagrantlab.settings({key: value})
    assert f"{key}={value} is outside 169.254.0.0/16" in str(e.value)


def test_vagrants_message_is_its_last_two_paragraphs_on_one_line():
    out = ["Bringing machine 'primary' up with 'libvirt' provider...", "",
           "The box 'x/y' could not be found or", "could not be accessed in the remote catalog.", "",
           "URL: [\"http://127.0.0.1:9/x/y\"]", "Error: Failed to connect", ""]
    assert vagrantlab._last(out) == ("The box 'x/y' could not be found or could not be accessed in the remote "
                                     "catalog. URL: [\"http://127.0.0.1:9/x/y\"] Error: Failed to connect")
    assert vagrantlab._last([]) == "(no output)"


def test_scripts_vagrant_lab_refuses_an_unknown_verb_in_one_line(capsys):
    assert vagrantlab.main(["sideways"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vagrant-lab: unknown or extra words 'sideways' (see 'scripts/vagrant-lab --help')"]


def fake_vagrant(tmp_path, monkeypatch, script: str) -> None:
    """A stand-in `vagrant` first on PATH, running script."""
    fake = tmp_path / "vagrant"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_a_vagrant_that_never_ends_is_killed_by_the_watchdog_with_its_last_words(tmp_path, monkeypatch):
    fake_vagrant(tmp_path, monkeypatch, "echo 'Bringing machine primary up...'\nsleep 600 &\nsleep 600\n")
    with pytest.raises(vagrantlab.VagrantFailed) as e:
        vagrantlab.vagrant("up", timeout=1, capture=True)
    assert str(e.value) == ("vagrant-lab: 'vagrant up' failed (exit killed): no end after 1 s; its last words: "
                            "Bringing machine primary up...")


def test_a_failed_vagrant_is_one_line_with_its_message(tmp_path, monkeypatch):
    fake_vagrant(tmp_path, monkeypatch, "echo 'The provider x could not be found.'\necho\necho 'Known: libvirt'\nexit 1\n")
    with pytest.raises(vagrantlab.VagrantFailed) as e:
        vagrantlab.vagrant("up", "--provider", "x", capture=True)
    assert str(e.value) == ("vagrant-lab: 'vagrant up --provider x' failed (exit 1): "
                            "The provider x could not be found. Known: libvirt")
