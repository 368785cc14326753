"""Issue 13: rcopy's ssh to the target's agent checks host keys, and a host key ssh refuses (unknown,
or changed) is an AuthFailed naming the target, the link and the fix (exit 20, the group stops with
fault "auth", which auto_recover never restarts), never a dead link. The CLI part runs the default
agent command through a fake ``ssh`` on PATH that answers as OpenSSH does, or runs the agent."""
import os
import sys

import pytest

from rcopy.model import Target
from rcopy.sys.channel import ssh_host_key_refusal
from tests.unit.test_cli_replication import Systems, needs_nbdkit_mark

CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:Qm3yXK1Kp0oQ4cQqkq2bq0bq4F9cQmQJb5v2YkGf0x8.
Please contact your system administrator.
Add correct host key in /root/.ssh/known_hosts to get rid of this message.
Offending ED25519 key in /root/.ssh/known_hosts:1
  remove with:
  ssh-keygen -f "/root/.ssh/known_hosts" -R "{link}"
Host key for {link} has changed and you have requested strict checking.
Host key verification failed.
"""
UNKNOWN = """No ED25519 host key is known for {link} and you have requested strict checking.
Host key verification failed.
"""


def test_ssh_stderr_is_classified_by_host_key_refusal():
    assert ssh_host_key_refusal(255, CHANGED.format(link="backup")) == "changed"
    assert ssh_host_key_refusal(255, UNKNOWN.format(link="backup")) == "unknown"
    assert ssh_host_key_refusal(255, "Host key verification failed.\n") == "unknown"
    for rc, err in ((255, "ssh: connect to host backup port 22: Connection refused\n"),
                    (255, "root@backup: Permission denied (publickey).\n"),
                    (0, UNKNOWN.format(link="backup")),              # not ssh's own failure
                    (1, "rcopy: error: Host key verification failed\n")):
        assert ssh_host_key_refusal(rc, err) == "", err


def test_the_default_agent_command_checks_host_keys_whatever_the_ssh_config_says():
    argv = Target("backup", ("backup",)).agent_command("backup").split()
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv


FAKE_SSH = """#!/bin/sh
# OpenSSH as far as host keys go: the mode file says what ssh makes of the target's host key
printf '%s\\n' "$*" >>"{log}"
for last; do :; done
case $(cat "{mode}") in
  changed) printf '%s' "{changed}" >&2; exit 255 ;;
  unknown) printf '%s' "{unknown}" >&2; exit 255 ;;
esac
exec {python} -m rcopy --state-dir "{state}" agent
"""


@needs_nbdkit_mark
def test_a_refused_host_key_stops_the_sync_with_the_fix_and_exit_20(tmp_path):
    s = Systems(tmp_path)
    bin_dir, mode, log = tmp_path / "bin", tmp_path / "ssh-mode", tmp_path / "ssh-argv"
    bin_dir.mkdir()
    mode.write_text("ok")
    (bin_dir / "ssh").write_text(FAKE_SSH.format(
        log=log, mode=mode, python=sys.executable, state=s.B,
        changed=CHANGED.format(link="127.0.0.1").replace('"', '\\"'), unknown=UNKNOWN.format(link="127.0.0.1")))
    (bin_dir / "ssh").chmod(0o755)
    s.env["PATH"] = f"{bin_dir}{os.pathsep}{s.env['PATH']}"
    s.rcopy("target", "create", "backup", "--link", "127.0.0.1")         # the default agent command: ssh
    s.rcopy("group", "create", "g", "--target", "backup", "--policy", "auto_recover")
    p, sec = s.volume("v1")
    s.rcopy("group", "admit", "g", p, f"backup:{sec}")
    s.rcopy("group", "start", "g", "--wait")
    assert all("StrictHostKeyChecking=yes" in line and "BatchMode=yes" in line
               for line in log.read_text().splitlines())
    for what, fix in (("changed", "has CHANGED"), ("unknown", "knows no host key")):
        mode.write_text(what)
        r = s.rcopy("sync", "g", "--wait", check=False)
        err = r.stderr.strip()
        assert r.returncode == 20 and "\n" not in err, (r.returncode, r.stderr)
        assert fix in err and "target backup" in err and "link 127.0.0.1" in err, err
        assert "ssh-keyscan -H 127.0.0.1 >> /root/.ssh/known_hosts" in err, err
        if what == "changed":
            assert "ssh-keygen -R 127.0.0.1" in err, err
        g = s.status()["groups"][0]                                     # the first refusal stopped it
        assert (g["state"], g["fault"]) == ("stopped", "auth") and "has CHANGED" in g["reason"], g
    mode.write_text("ok")                                                 # the administrator fixed known_hosts
    s.rcopy("sync", "g", "--wait")
    g = s.status()["groups"][0]
    assert (g["state"], g["fault"], g["sync_point"]["generation"]) == ("started", "", 2), g
