"""Issue 13 in the lab: during a sync only the primary that began it can reach the export. Connections
from the backup's own loopback, from the backup as an unprivileged user, and from the primary without the
session's client certificate are all refused, and the sync still lands exactly."""
import re
import time

import pytest

from tests.lab.dm_guest import run_guest
from tests.lab.test_replication import (MIB, VG, assert_secondaries_equal_sync_point, group, rc, status)

pytestmark = pytest.mark.lab


def test_only_the_primary_of_the_session_reaches_the_export(clean_lab):
    lab = clean_lab
    group(lab)
    # a long sync: the thick volume goes full (its P1 overflows), the thin one a whole-volume delta
    run_guest(lab, f"fill_random('/dev/{VG}/thickvol', {MIB}, seed=51)\n"
                   f"fill_random('/dev/{VG}/thinvol', {MIB}, seed=52)", "primary")
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
    assert f"169.254.77.2:{port}" in still, "the sync ended before every intruder was tried: grow the volumes"
    lab.run("primary", "while kill -0 $(cat /tmp/sync.pid) 2>/dev/null; do sleep 1; done", timeout=900)
    g = status(lab)
    assert g["state"] == "started" and g["sync_point"]["generation"] == 2, lab.run("primary", "cat /tmp/sync.out").stdout
    assert_secondaries_equal_sync_point(lab, 2)                  # nothing but the primary's data landed
    rc(lab, "verify", "g")
