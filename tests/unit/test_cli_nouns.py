"""The smaller nouns through the real CLI: targets, links, group set/stop/dismiss/remove, status views,
sync --dry-run (the plan printed, nothing changed)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.unit.test_cli_replication import Systems, needs_nbdkit_mark


def _systems(tmp_path):
    s = Systems(tmp_path)
    s.rcopy("target", "create", "backup", "--link", "127.0.0.1",
            "--agent", f"{sys.executable} -m rcopy --state-dir {s.B} agent")
    return s


def test_targets_and_links(tmp_path):
    s = _systems(tmp_path)
    s.rcopy("link", "add", "backup", "127.0.0.2")
    r = s.rcopy("link", "add", "backup", "127.0.0.2", check=False)
    assert r.returncode == 4
    t = json.loads(s.rcopy("target", "list", "--json").stdout)
    assert t[0]["links"] == ["127.0.0.1", "127.0.0.2"] and "agent" in t[0]["agent"]
    links = s.status()["targets"][0]["links"]
    assert [l["address"] for l in links] == ["127.0.0.1", "127.0.0.2"]
    s.rcopy("link", "remove", "backup", "127.0.0.2")
    assert s.rcopy("link", "remove", "backup", "127.0.0.1", check=False).returncode == 5    # the last link
    assert s.rcopy("link", "remove", "backup", "169.254.99.9", check=False).returncode == 3
    out = json.loads(s.rcopy("status", "links", "--json").stdout)
    assert "groups" not in out and out["targets"][0]["name"] == "backup"
    s.rcopy("target", "remove", "backup")
    assert json.loads(s.rcopy("target", "list", "--json").stdout) == []


def test_first_working_link_is_used(tmp_path):
    s = Systems(tmp_path)
    s.rcopy("target", "create", "backup", "--link", "dead", "--link", "127.0.0.1",
            "--agent", f"sh -c 'test {{link}} = 127.0.0.1 && exec {sys.executable} -m rcopy --state-dir {s.B} agent'")
    s.rcopy("group", "create", "g", "--target", "backup")
    states = {l["address"]: l["state"] for l in s.status()["targets"][0]["links"]}
    assert states == {"dead": "down", "127.0.0.1": "up"}


@needs_nbdkit_mark
def test_group_lifecycle_set_stop_dismiss_remove_and_dry_run(tmp_path):
    s = _systems(tmp_path)
    s.rcopy("group", "create", "g", "--target", "backup")
    p, sec = s.volume("v1")
    s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    s.rcopy("group", "set", "g", "--period", "2h", "--policy", "over_per_alert")
    g = s.status()["groups"][0]
    assert g["period"] == 7200 and g["policies"] == ["over_per_alert"] and g["next_sync"] is None
    assert s.rcopy("group", "set", "g", "--policy", "bogus", check=False).returncode == 2
    s.rcopy("group", "start", "g", "--wait")
    g = s.status()["groups"][0]
    assert g["next_sync"] == g["last_sync_start"] + 7200
    plan = s.rcopy("sync", "g", "--dry-run").stdout
    assert "rcopy.g.v1-img.P1 and rcopy.g.v1-img.P2" in plan and "commit sync point 2" in plan
    assert s.status()["groups"][0]["sync_point"]["generation"] == 1      # the dry run changed nothing
    assert s.rcopy("group", "dismiss", "g", p, check=False).returncode == 5   # started: refused
    s.rcopy("group", "stop", "g")
    g = s.status()["groups"][0]
    assert g["state"] == "stopped" and g["reason"] == "stopped by the administrator"
    assert s.rcopy("group", "stop", "g", check=False).returncode == 5
    s.rcopy("group", "dismiss", "g", p)
    assert s.status()["groups"][0]["volumes"] == [] and s.status(s.B)["groups"][0]["volumes"] == []
    assert not os.path.exists(os.path.join(os.path.dirname(p), "rcopy.g.v1-img.P1"))
    s.rcopy("group", "remove", "g")
    assert s.status()["groups"] == [] and s.status(s.B)["groups"] == []
    assert s.rcopy("status", "groups", "g", check=False).returncode == 3


@needs_nbdkit_mark
def test_daemon_runs_the_due_periodic_sync(tmp_path):
    from rcopy.state import Store
    s = _systems(tmp_path)
    s.rcopy("group", "create", "g", "--target", "backup", "--period", "15s")
    p, sec = s.volume("v1")
    s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    s.rcopy("group", "start", "g", "--wait")
    s.write_random(p, 3, seed=1)
    s.rcopy("daemon", "--once")                  # not due yet: the sync just ran
    assert s.status()["groups"][0]["sync_point"]["generation"] == 1
    st = Store(s.A)
    st.update_group("g", last_sync_start=1.0, last_sync_end=2.0)   # as if the period had passed
    st.close()
    s.rcopy("daemon", "--once")
    g = s.status()["groups"][0]
    assert g["sync_point"]["generation"] == 2 and g["volumes"][0]["full_reason"] == ""
    s.rcopy("verify", "g")


@pytest.mark.parametrize("args", [
    ("target", "create", "t", "--link", "x -oProxyCommand=touch /tmp/pwned"),
    ("target", "create", "t", "--link=-oProxyCommand=touch /tmp/pwned"),
    ("target", "create", "t", "--link", "a b"),
    ("target", "create", "t", "--link", "host;reboot"),
    ("group", "stop", "../../x"),
    ("group", "start", "../x", "--wait"),
    ("sync", "../../x", "--wait"),
])
def test_hostile_names_and_addresses_are_refused_and_create_nothing(tmp_path, args):
    """Issue 13: a link goes into ssh's command line and a group name into a path: both are checked
    where they enter, with exit 2 and nothing created anywhere."""
    state = tmp_path / "state" / "A"
    before = set(p for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "rcopy", "--state-dir", str(state), *args], capture_output=True,
                       text=True, env={**os.environ, "RCOPY_ALLOW_NONROOT": "1"}, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rcopy: error: bad")
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if not str(p).startswith(str(state.parent))], created   # nothing outside
    assert not [p for p in created if p.name.endswith(".lock") or p.name == "x"], created
    assert not os.path.exists("/tmp/pwned")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing (Debian: systemd)")
def test_daemon_install_unit_writes_a_unit_that_systemd_accepts(tmp_path):
    """Issue 14: the unit is installed by one documented command and passes systemd-analyze verify."""
    r = subprocess.run([sys.executable, "-m", "rcopy", "daemon", "--install-unit", "--unit-dir", str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "RCOPY_ALLOW_NONROOT": "1"})
    assert r.returncode == 0 and "systemctl enable --now rcopy" in r.stdout, r.stderr
    unit = (tmp_path / "rcopy.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert os.path.isabs(exec_line.split("=", 1)[1].split()[0]) and exec_line.endswith(" daemon")
    v = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "rcopy.service")], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


def test_target_create_prints_the_restricted_authorized_keys_line(tmp_path):
    """Issue 13: the agent can be reached with a key that may run nothing but ``rcopy agent``."""
    r = subprocess.run([sys.executable, "-m", "rcopy", "--state-dir", str(tmp_path / "A"), "target", "create", "b",
                        "--link", "169.254.77.2"], capture_output=True, text=True,
                       env={**os.environ, "RCOPY_ALLOW_NONROOT": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert 'restrict,command="rcopy agent" <this system' in r.stdout
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3Nza root@primary\n")
    r = subprocess.run([sys.executable, "-m", "rcopy", "--state-dir", str(tmp_path / "A"), "target", "create", "c",
                        "--link", "backup"], capture_output=True, text=True,
                       env={**os.environ, "RCOPY_ALLOW_NONROOT": "1", "HOME": str(tmp_path)})
    assert 'restrict,command="rcopy agent" ssh-ed25519 AAAAC3Nza root@primary' in r.stdout


def test_target_timeouts_are_set_shown_and_checked(tmp_path):
    s = _systems(tmp_path)
    t = json.loads(s.rcopy("target", "list", "--json").stdout)[0]
    assert (t["link_timeout"], t["target_timeout"]) == (25, 200)            # 3PAR's
    s.rcopy("target", "set", "backup", "--link-timeout", "12", "--target-timeout", "60")
    t = json.loads(s.rcopy("target", "list", "--json").stdout)[0]
    assert (t["link_timeout"], t["target_timeout"]) == (12, 60)
    for args in (["--link-timeout", "2"], ["--target-timeout", "999999"], []):
        r = s.rcopy("target", "set", "backup", *args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = s.rcopy("target", "create", "other", "--link", "h", "--link-timeout", "1", check=False)
    assert r.returncode == 2 and "link timeout 1 s is out of range" in r.stderr
    assert [t["name"] for t in json.loads(s.rcopy("target", "list", "--json").stdout)] == ["backup"]
    assert s.rcopy("target", "set", "nobody", "--link-timeout", "30", check=False).returncode == 3


def test_the_default_agent_command_gives_ssh_the_link_timeout():
    from rcopy.model import Target
    assert "-o ServerAliveInterval=5 -o ServerAliveCountMax=5 root@h rcopy agent" in Target("t", ("h",)).agent_command("h")
    assert "ServerAliveCountMax=3 root@h" in Target("t", ("h",), link_timeout=12).agent_command("h")
    custom = Target("t", ("h",), "ssh -o ServerAliveCountMax={alive_count} {link} rcopy agent", link_timeout=40)
    assert custom.agent_command("h") == "ssh -o ServerAliveCountMax=8 h rcopy agent"


def test_ssh_sharing_is_a_per_target_option_off_by_default(tmp_path):
    """Issue 15: ``--ssh-persist S`` adds ssh's ControlMaster options to the default agent command (and
    to a custom one through ``{ssh_share}``); off by default, set, shown, range-checked, turned off."""
    from rcopy.model import Target
    assert "Control" not in Target("t", ("h",)).agent_command("h")
    on = Target("t", ("h",), ssh_persist=300).agent_command("h")
    assert ("-o ControlMaster=auto -o ControlPath=/run/rcopy/ssh-%C -o ControlPersist=300 root@h rcopy agent"
            in on)
    custom = Target("t", ("h",), "ssh {ssh_share}{link} rcopy agent", ssh_persist=60)
    assert custom.agent_command("h") == ("ssh -o ControlMaster=auto -o ControlPath=/run/rcopy/ssh-%C "
                                         "-o ControlPersist=60 h rcopy agent")
    s = _systems(tmp_path)
    assert json.loads(s.rcopy("target", "list", "--json").stdout)[0]["ssh_persist"] == 0
    r = s.rcopy("target", "set", "backup", "--ssh-persist", "600")
    assert "ssh connections kept 600 s" in r.stdout
    t = json.loads(s.rcopy("target", "list", "--json").stdout)[0]
    assert t["ssh_persist"] == 600 and (t["link_timeout"], t["target_timeout"]) == (25, 200)
    r = s.rcopy("target", "set", "backup", "--ssh-persist", "3", check=False)
    assert r.returncode == 2 and "ssh persist 3 s is out of range" in r.stderr and "Traceback" not in r.stderr
    s.rcopy("target", "set", "backup", "--ssh-persist", "0")
    assert json.loads(s.rcopy("target", "list", "--json").stdout)[0]["ssh_persist"] == 0
    r = s.rcopy("target", "create", "other", "--link", "h", "--ssh-persist", "120")
    assert [t["ssh_persist"] for t in json.loads(s.rcopy("target", "list", "--json").stdout)] == [0, 120]
