"""Issue 13 in the lab: during a sync only the primary that began it can reach the export. Connections
from the backup's own loopback, from the backup as an unprivileged user, and from the primary without the
session's client certificate are all refused, and the sync still lands exactly. rcopy's ssh to the
backup checks its host key (the lab's reset writes the peers' keys into known_hosts): a changed or
unknown key stops the sync with the fix and exit 20. The ``restrict,command="rcopy agent"`` line that
``rcopy target create`` prints lets the primary run the agent and nothing else."""
import re
import shlex
import time

import pytest

from tests.lab.dm_guest import run_guest
from tests.lab.test_replication import (MIB, SETUP, VG, VOLS, assert_secondaries_equal_sync_point, dev, group,
                                        rc, status, write_random)

pytestmark = pytest.mark.lab


def test_only_the_primary_of_the_session_reaches_the_export(clean_lab):
    lab = clean_lab
    group(lab)
    # a long sync: the thick volume goes full (its P1 overflows), the thin one a whole-volume delta
    run_guest(lab, f"fill_random('/dev/{VG}/thickvol', {MIB}, seed=51)\n"
                   f"fill_random('/dev/{VG}/thinvol', {MIB}, seed=52)", "primary")
    # ~2 MB/s on the link: the export stays up while every intruder below is tried, however fast the
    # sync's own start has become (unthrottled, it once ended first)
    lab.throttle("primary", "16mbit")
    lab.run("primary", "nohup rcopy sync g --wait </dev/null >/tmp/sync.out 2>&1 & echo $! >/tmp/sync.pid")
    port = None
    for _ in range(600):
        out = lab.run("backup", "ss -Hltnp | grep nbdkit || true").stdout
        m = re.search(r"169\.254\.77\.2:(\d+)", out)
        if m:
            port = int(m.group(1))
            break
        if lab.run("primary", "kill -0 $(cat /tmp/sync.pid)", check=False).returncode:
            pytest.fail("the sync ended before its export appeared: " + lab.run("primary", "cat /tmp/sync.out").stdout)
        time.sleep(0.2)
    assert port, "no export appeared on the backup's link address"
    listening = set(re.findall(r"LISTEN\s+\d+\s+\d+\s+(\S+):\d+", out))
    assert listening == {"169.254.77.2"}, out                              # bound to the link only
    # the second fence: rcopy's nbdkit filter admits the primary's link address only, and closes any
    # other connection before the NBD greeting (TLS would refuse it only after the greeting)
    argv = lab.run("backup", "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = nbdkit ] "
                             "&& tr '\\0' ' ' <$p/cmdline; done; true").stdout
    assert "nbdkit-rcopy-peer.so" in argv and "allow=169.254.77.1" in argv, argv
    greeting = ("python3 -c \"import socket; s = socket.create_connection(('169.254.77.2', %d), 30); "
                "s.settimeout(30); print(s.recv(8, socket.MSG_WAITALL))\"" % port)
    assert lab.run("backup", greeting).stdout.strip() == "b''"             # the backup itself: no greeting
    assert lab.run("primary", greeting).stdout.strip() == "b'NBDMAGIC'"
    attempts = {
        "backup loopback": ("backup", f"nbdinfo nbd://127.0.0.1:{port}/thickvol"),
        "backup, unprivileged, plaintext": ("backup", f"setpriv --reuid=65534 --regid=65534 --clear-groups "
                                                      f"nbdinfo nbd://169.254.77.2:{port}/thickvol"),
        "backup, unprivileged, TLS without certificate": (
            "backup", f"setpriv --reuid=65534 --regid=65534 --clear-groups "
                      f"nbdinfo nbds://169.254.77.2:{port}/thickvol?tls-verify-peer=false"),
        "primary without the session's certificate": (
            "primary", f"nbdinfo nbds://169.254.77.2:{port}/thickvol?tls-verify-peer=false"),
        "primary writing without the certificate": (
            "primary", f"nbdcopy /dev/zero 'nbds://169.254.77.2:{port}/thickvol?tls-verify-peer=false'"),
        "export listing": ("primary", f"nbdinfo --list 'nbds://169.254.77.2:{port}?tls-verify-peer=false'"),
    }
    for what, (host, cmd) in attempts.items():
        r = lab.run(host, f"timeout 60 {cmd}", check=False)
        assert r.returncode != 0 and "export-size" not in r.stdout and "thickvol" not in r.stdout, (what, r.stdout)
    still = lab.run("backup", "ss -Hltn").stdout
    assert f"169.254.77.2:{port}" in still, "the sync ended before every intruder was tried: slow the link more"
    lab.throttle("primary", None)
    lab.run("primary", "while kill -0 $(cat /tmp/sync.pid) 2>/dev/null; do sleep 1; done", timeout=900)
    g = status(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 2, lab.run("primary", "cat /tmp/sync.out").stdout
    assert_secondaries_equal_sync_point(lab, 2)                  # nothing but the primary's data landed
    rc(lab, "verify", "g")


def test_a_changed_or_unknown_host_key_of_the_backup_stops_the_sync_with_the_fix(clean_lab):
    lab = clean_lab
    group(lab)                                  # set up and started over ssh that checks the backup's key
    argv = rc(lab, "target", "list").stdout
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv, argv
    # someone else answers as "backup": known_hosts holds another key for that name
    lab.run("primary", "ssh-keygen -q -t ed25519 -N '' -f /tmp/other && sed -i '/^backup /d' /root/.ssh/known_hosts "
                       "&& echo \"backup $(cut -d' ' -f1,2 /tmp/other.pub)\" >>/root/.ssh/known_hosts")
    r = rc(lab, "sync", "g", "--wait", check=False)
    err = r.stderr.strip()
    assert r.returncode == 20 and "\n" not in err, (r.returncode, r.stderr)
    assert "target backup" in err and "link backup has CHANGED" in err and "ssh-keygen -R backup" in err, err
    g = status(lab)
    assert (g["state"], g["fault"]) == ("stopped", "auth") and "has CHANGED" in g["reason"], g
    # no key known for "backup" at all: rcopy does not accept one on first use
    lab.run("primary", "sed -i '/^backup /d' /root/.ssh/known_hosts")
    r = rc(lab, "sync", "g", "--wait", check=False)
    err = r.stderr.strip()
    assert r.returncode == 20 and "\n" not in err, (r.returncode, r.stderr)
    assert "knows no host key" in err and "ssh-keyscan -H backup >> /root/.ssh/known_hosts" in err, err
    # the fix the message names (after checking the fingerprint), then a sync goes through again
    lab.run("primary", "ssh-keyscan -H backup >>/root/.ssh/known_hosts 2>/dev/null")
    write_random(lab, 4, seed=62)               # something to send (a quiet group is only confirmed)
    rc(lab, "sync", "g", "--wait")
    g = status(lab)
    assert (g["state"], g["fault"], g["sync_point"]["generation"]) == ("started", "", 2), g
    assert_secondaries_equal_sync_point(lab, 2)


def test_the_restricted_key_runs_the_agent_and_nothing_else(clean_lab):
    lab = clean_lab
    run_guest(lab, SETUP, "primary")
    run_guest(lab, SETUP, "backup")
    # a key of rcopy's own on the primary (ssh offers id_ecdsa before the lab's id_ed25519, which the lab
    # itself needs unrestricted to drive the backup)
    pub = lab.run("primary", "ssh-keygen -q -t ecdsa -N '' -f /root/.ssh/id_ecdsa && cat /root/.ssh/id_ecdsa.pub"
                  ).stdout.strip()
    out = rc(lab, "target", "create", "backup", "--link", "backup").stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("restrict,")]
    assert lines == [f'restrict,command="rcopy agent" {pub}'], out
    try:
        lab.run("backup", f"printf '%s\\n' {shlex.quote(lines[0])} >>/root/.ssh/authorized_keys")
        # any command through that key runs the agent instead: it answers rcopy's hello, `id` never runs
        hello = '{"id": 1, "op": "hello", "args": {"protocol": 1}}'
        r = lab.run("primary", f"echo {shlex.quote(hello)} | ssh backup id; ssh backup touch /tmp/intruded </dev/null",
                    check=False)
        assert '"ok": true' in r.stdout and '"system": "backup"' in r.stdout and "uid=" not in r.stdout, r.stdout
        assert lab.run("backup", "test -e /tmp/intruded", check=False).returncode != 0
        # and rcopy itself works through it: the initial sync and a delta
        rc(lab, "target", "create", "primary", "--link", "primary", host="backup")
        rc(lab, "group", "create", "g", "--target", "backup")
        for v in VOLS:
            rc(lab, "group", "admit", "g", dev(v), f"backup:{dev(v)}")
        rc(lab, "group", "start", "g", "--wait")
        write_random(lab, 16, seed=61)
        rc(lab, "sync", "g", "--wait")
        assert status(lab)["sync_point"]["generation"] == 2
        assert_secondaries_equal_sync_point(lab, 2)
    finally:   # the lab's reset undoes this too; done here so a failure leaves nothing behind either
        lab.run("backup", "sed -i '/^restrict,/d' /root/.ssh/authorized_keys", check=False)
        lab.run("primary", "rm -f /root/.ssh/id_ecdsa /root/.ssh/id_ecdsa.pub", check=False)
