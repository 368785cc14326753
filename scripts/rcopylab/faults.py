"""scripts/faults: the randomized fault campaign (issue 11) in the two-VM lab.

One group of a thin and a thick volume replicates from `primary` to `backup`, with `rcopy daemon`
running on the primary as under systemd. Each run: random writes, a writer rewriting block 0 of both
volumes, a sync started in the background, and at a random moment one fault, drawn so that every kind
comes up in turn (shuffled by the seed): both links down for a while shorter or longer than the
backup's agent timeout (45 s here), one link alone down for 5 to 40 s (``link1``, ``link2``: whichever
carries the control channel, it moves to the other), a power cut of either VM, SIGKILL or SIGTERM of the
primary's sync, SIGKILL of the backup's agent, read errors under the primary's thick volume (a dm error segment loaded under it), the
backup's thin pool filled. Then the fault is repaired as an admin would (boot, link up, table back, space
freed) and the run checks, once no sync is in flight on either side:

1. every secondary hash-equals the primary's snapshot of the backup's committed sync point (one point
   for the whole group, never a mix); with one link lost, that point is the run's own sync (the other
   carried it, control channel included: losing a link is an alert, not a failure);
2. a sync then completes (``rcopy group start``/``rcopy sync --wait``) and ``rcopy verify`` passes;
3. no device-mapper device is left suspended, no snapshot outside rcopy's census (the primary's P of its
   sync point, nothing on the backup), no nbdkit left running.

One JSON line per run, then ``N survived, M lost`` (exit 1 on a loss). A run the lab itself broke (a
hung guest, a VM that does not boot) is counted apart as ``lab``, with its console excerpt.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from rcopylab.replication_demo import AGENT as DEMO_AGENT, WRITE, lvm_setup

KINDS = ("link-short", "link-long", "link1", "link2", "crash-primary", "crash-backup", "kill-primary", "term-primary",
         "kill-agent", "read-error", "pool-full")
VG, MIB, VOLS = "rcopytest", 32, ("thinvol", "thickvol")
# The agent gives a silent primary 45 s: ssh (ServerAlive 3 x 5 s) and a new channel over the other link
# (~5 s in the lab) fit inside it, so a channel moved after one link's loss is never raced by a rollback
AGENT_TIMEOUT = 45
AGENT = DEMO_AGENT.replace("RCOPY_AGENT_TIMEOUT=20", f"RCOPY_AGENT_TIMEOUT={AGENT_TIMEOUT}")
assert AGENT != DEMO_AGENT
SETUP = lvm_setup(VG, MIB, 160)
FILL = " && ".join(f"dd if=/dev/urandom of=/dev/{VG}/{v} bs=1M count=8 oflag=direct status=none" for v in VOLS)
# Rewrites block 0 of both volumes until killed; I/O errors (a fault under it) are the fault's, not its own.
WRITER = f"""import mmap, os, time
fds = [os.open(p, os.O_WRONLY | os.O_DIRECT) for p in ("/dev/{VG}/thinvol", "/dev/{VG}/thickvol")]
buf = mmap.mmap(-1, 4096)
k = 0
while True:
    k += 1
    buf.seek(0)
    buf.write(k.to_bytes(8, "little") * 512)
    for fd in fds:
        try:
            os.pwrite(fd, buf, 0)
        except OSError:
            time.sleep(0.2)
    time.sleep(0.01)
"""
# "$d", not the word: this shell's own command line must not match the pattern it looks for (it did,
# and the campaign ran without daemons: a killed agent's sync stayed in flight on the backup)
DAEMON_UP = "pgrep -f '^[^ ]*python[^ ]* [^ ]*rcopy daemon' >/dev/null"
DAEMON = f"d=daemon; {DAEMON_UP} || (nohup rcopy $d >>/var/log/rcopy-daemon.log 2>&1 &)"
# sectors 8-24 MiB of the thick volume's data (the writer's block 0 stays readable)
ERROR_ON = f"""set -e
dev={VG}-thickvol-real; dmsetup info $dev >/dev/null 2>&1 || dev={VG}-thickvol
dmsetup table $dev > /run/rcopy-fault-table
read -r start len kind pdev poff < /run/rcopy-fault-table
a=16384; b=49152
printf '0 %s linear %s %s\\n%s %s error\\n%s %s linear %s %s\\n' $a $pdev $poff $a $((b-a)) $b $((len-b)) $pdev $((poff+b)) | dmsetup load $dev
dmsetup suspend $dev && dmsetup resume $dev
echo $dev > /run/rcopy-fault-dev
"""
ERROR_OFF = """set -e
[ -f /run/rcopy-fault-dev ] || exit 0
dev=$(cat /run/rcopy-fault-dev)
rm -f /run/rcopy-fault-dev
dmsetup info $dev >/dev/null 2>&1 || exit 0      # LVM rebuilt or removed it meanwhile
grep -q error <(dmsetup table $dev) || exit 0
dmsetup load $dev /run/rcopy-fault-table && dmsetup suspend $dev && dmsetup resume $dev
"""
FILL_POOL = f"""set -e
free=$(lvs --noheadings --units m --nosuffix -o lv_size,data_percent {VG}/pool | awk '{{printf "%d", $1 * (97 - $2) / 100}}')
lvcreate -qq -y -V ${{free}}m -T {VG}/pool -n filler >/dev/null
dd if=/dev/urandom of=/dev/{VG}/filler bs=1M count=$free oflag=direct status=none || true
"""


class Lost(Exception):
    """The product broke its promise in this run."""


class Campaign:
    def __init__(self, lab, rnd: random.Random, say=print):
        self.lab, self.rnd, self.say = lab, rnd, say
        self.ready = False

    # -- lab helpers -------------------------------------------------------------------------------
    def sh(self, host, cmd, *, check=True, input=None, timeout=600):
        return self.lab.run(host, cmd, check=check, input=input, timeout=timeout)

    def status(self, host):
        r = self.sh(host, "rcopy status --json", check=False)
        try:
            return next(g for g in json.loads(r.stdout)["groups"] if g["name"] == "g")
        except (ValueError, KeyError, StopIteration):
            raise Lost(f"{host}: rcopy status --json gave no group g: {(r.stdout + r.stderr)[-300:]}") from None

    def setup(self):
        self.lab.reset()
        for h in ("primary", "backup"):
            self.sh(h, "bash -s", input=SETUP)
        self.sh("primary", FILL)
        self.sh("primary", f"rcopy target create backup --link backup --agent '{AGENT}'")
        self.sh("backup", "rcopy target create primary --link primary")
        # two links: the data spreads over both, the control channel takes the first
        self.sh("primary", "rcopy link add backup backup-2")
        self.sh("backup", "rcopy link add primary primary-2")
        self.sh("primary", "rcopy group create g --target backup")
        for v in VOLS:
            self.sh("primary", f"rcopy group admit g /dev/{VG}/{v} backup:/dev/{VG}/{v}")
        self.sh("primary", "rcopy group start g --wait", timeout=900)
        for h in ("primary", "backup"):
            self.sh(h, DAEMON)
            self.sh(h, f"for i in $(seq 50); do {DAEMON_UP} && exit 0; sleep 0.2; done; "
                       "echo rcopy daemon did not start >&2; exit 1")
        self.ready = True

    # -- one run -----------------------------------------------------------------------------------
    def run(self, kind: str) -> dict:
        steps, t = {}, time.monotonic()

        def step(name):                         # seconds per step, in the run's record
            nonlocal t
            now = time.monotonic()
            steps[name], t = round(now - t, 1), now
        if not self.ready:
            self.setup()
            step("setup")
        rnd = self.rnd
        before = self.status("backup")["sync_point"]["generation"]
        blocks = rnd.randrange(50, 1500)
        self.sh("primary", "python3 -", input=WRITE.format(seed=rnd.randrange(1 << 30), vols=list(VOLS), vg=VG,
                                                            nblocks=MIB * 256, blocks=blocks, block=4096))
        self.sh("primary", "nohup python3 -c \"$(cat)\" >/dev/null 2>&1 & echo $! > /run/rcopy-writer",
                input=WRITER)
        if kind == "pool-full":
            self.sh("backup", "bash -s", input=FILL_POOL, timeout=900)
        delay = round(rnd.uniform(0.0, 8.0), 1)
        self.sh("primary", "rcopy sync g >/dev/null 2>&1 || true")
        time.sleep(delay)
        step("start")
        self.fault(kind, rnd)
        step("fault")
        self.repair(kind)
        step("repair")
        self.settle()
        step("settle")
        self.sh("primary", "kill $(cat /run/rcopy-writer) 2>/dev/null || true")
        point = self.check_one_point()
        step("check")
        if kind in ("link1", "link2") and point <= before:
            raise Lost(f"the sync did not commit with one link up all along (backup at {point}, was {before}): "
                       f"{self.status('primary')['reason']}")
        recovered = self.recover()
        step("recover")
        self.census(recovered)
        step("census")
        return {"kind": kind, "delay": delay, "blocks": blocks, "before": before, "held": point,
                "after": recovered, "steps": steps}

    def fault(self, kind: str, rnd: random.Random):
        if kind == "link-short":
            self.lab.link(False)
            time.sleep(rnd.uniform(2, 10))
        elif kind == "link-long":
            self.lab.link(False)
            time.sleep(rnd.uniform(AGENT_TIMEOUT + 5, AGENT_TIMEOUT + 20))   # past the agent's timeout
        elif kind in ("link1", "link2"):
            self.lab.link(False, int(kind[-1]))
            time.sleep(rnd.uniform(5, 40))      # shorter and longer than the NBD reply timeout (30 s)
        elif kind in ("crash-primary", "crash-backup"):
            self.lab.crash(kind.split("-")[1])
        elif kind == "kill-primary":
            self.sh("primary", "pkill -KILL -f '[r]copy sync' || true")
        elif kind == "term-primary":
            self.sh("primary", "pkill -TERM -f '[r]copy sync' || true")
        elif kind == "kill-agent":
            self.sh("backup", "pkill -KILL -f '[r]copy agent' || true")
        elif kind == "read-error":
            # after the cut (taking a snapshot rebuilds the origin's tables, which would undo the fault)
            nxt = f"{VG}/rcopy.g.thickvol.P{self.status('primary')['sync_point']['generation'] + 1}"
            self.sh("primary", f"for i in $(seq 60); do lvs {nxt} >/dev/null 2>&1 && break; sleep 0.5; done")
            self.sh("primary", "bash -s", input=ERROR_ON)
            time.sleep(rnd.uniform(3, 10))
        # pool-full: the pool was filled before the sync began

    def repair(self, kind: str):
        if kind.startswith("link"):
            self.lab.link(True)                 # both (the one not cut is up already)
        elif kind.startswith("crash"):
            host = kind.split("-")[1]
            self.lab.start(host)
            self.sh(host, DAEMON)
        elif kind == "read-error":
            self.settle()
            self.sh("primary", "bash -s", input=ERROR_OFF)
        elif kind == "pool-full":
            self.settle()
            self.sh("backup", f"lvremove -qq -y {VG}/filler")

    def settle(self, timeout: float = 300.0):
        """No sync in flight on either side and nobody holding the group (the agent gives up 45 s after
        its primary went silent; the backup's daemon rolls back a killed agent's sync; the primary's
        reconciles a crashed one within 30 s). ``busy`` matters: a sync still connecting has recorded
        nothing yet, and one that goes on after the look would race the hashes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            a, b = self.status("primary"), self.status("backup")
            if not (a["syncing_generation"] or b["syncing_generation"] or a["busy"] or b["busy"]):
                return a, b
            time.sleep(2)
        raise Lost(f"a sync stayed in flight for {timeout:.0f} s: primary {a['syncing_generation']} "
                   f"(busy {a['busy']}), backup {b['syncing_generation']} (busy {b['busy']}) "
                   f"({a['reason']} / {b['reason']})")

    def check_one_point(self) -> int:
        b = self.status("backup")
        n = b["sync_point"]["generation"]
        snaps = [f"rcopy.g.{v}.P{n}" for v in VOLS]
        self.sh("primary", f"lvchange -ay -K {VG}/{snaps[0]} 2>/dev/null || true")
        p = self.sh("primary", "sha256sum " + " ".join(f"/dev/{VG}/{s}" for s in snaps), check=False)
        s = self.sh("backup", "sha256sum " + " ".join(f"/dev/{VG}/{v}" for v in VOLS))
        if p.returncode:
            raise Lost(f"the primary has no snapshot of the backup's sync point {n}: {p.stderr.strip()[-200:]}")
        if p.stdout.split()[0::2] != s.stdout.split()[0::2]:
            raise Lost(f"the backup's secondaries are not all at sync point {n}: "
                       f"{p.stdout.split()[0::2]} vs {s.stdout.split()[0::2]}")
        return n

    def recover(self) -> int:
        for _ in range(30):                     # the daemon may be reconciling: wait for its lock
            a = self.status("primary")
            verb = "group start g --wait" if a["state"] != "started" else "sync g --wait"
            r = self.sh("primary", f"rcopy {verb}", check=False, timeout=900)
            if r.returncode == 0:
                break
            if r.returncode != 8:               # 8: busy
                raise Lost(f"recovery 'rcopy {verb}' failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
            time.sleep(2)
        else:
            raise Lost("recovery never got the group's lock")
        v = self.sh("primary", "rcopy verify g", check=False, timeout=900)
        if v.returncode:
            raise Lost(f"rcopy verify failed after recovery: {(v.stdout + v.stderr).strip()[-300:]}")
        return self.status("primary")["sync_point"]["generation"]

    def census(self, n: int):
        for host, allowed in (("primary", {f"rcopy.g.{v}.P{n}" for v in VOLS}), ("backup", set())):
            sus = self.sh(host, "dmsetup info -c --noheadings -o name,suspended | grep -i suspended || true").stdout
            if sus.strip():
                raise Lost(f"{host}: left suspended: {sus.strip()}")
            lvs = set(self.sh(host, f"lvs --noheadings -o lv_name {VG}").stdout.split())
            extra = {x for x in lvs if x.startswith("rcopy.")} - allowed
            if extra:
                raise Lost(f"{host}: snapshots outside the census: {sorted(extra)}")
        if self.sh("backup", "pgrep -x nbdkit", check=False).returncode == 0:
            raise Lost("backup: an nbdkit is still running")


def order(rnd: random.Random, runs: int, kinds=KINDS) -> list[str]:
    """Every kind in turn, shuffled per round: each is drawn runs/len(kinds) times, give or take one."""
    out: list[str] = []
    while len(out) < runs:
        round_ = list(kinds)
        rnd.shuffle(round_)
        out += round_
    return out[:runs]


def campaign(lab, seed: int, runs: int, kinds=KINDS, say=print) -> tuple[int, int, int]:
    from rcopy.errors import RcopyError
    rnd = random.Random(seed)
    c = Campaign(lab, rnd, say)
    survived = lost = broken = 0
    for i, kind in enumerate(order(rnd, runs, kinds)):
        t0 = time.monotonic()
        rec = {"run": i, "seed": seed, "kind": kind}
        try:
            rec.update(c.run(kind), outcome="survived")
            survived += 1
        except Lost as e:
            rec.update(outcome="lost", why=str(e))
            lost += 1
            c.ready = False                      # start the next run from a clean lab
        except RcopyError as e:                  # the lab itself: a hung guest, a VM that did not boot
            rec.update(outcome="lab", why=str(e)[-600:])
            broken += 1
            c.ready = False
        rec["seconds"] = round(time.monotonic() - t0, 1)
        say(json.dumps(rec, sort_keys=True))
    say(f"{survived} survived, {lost} lost" + (f", {broken} broken by the lab" if broken else ""))
    return survived, lost, broken


def main(argv=None) -> int:
    from rcopylab.labctl import Lab
    p = argparse.ArgumentParser(prog="scripts/faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=len(KINDS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma separated subset of " + ", ".join(KINDS))
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = set(kinds) - set(KINDS)
    if bad:
        p.error(f"unknown fault kind {sorted(bad)[0]}")
    lab = Lab(log=lambda m: print(m, file=sys.stderr, flush=True))
    lab.ensure_up()
    _, lost, broken = campaign(lab, args.seed, args.runs, kinds, say=lambda m: print(m, flush=True))
    return 1 if lost else (3 if broken else 0)


if __name__ == "__main__":
    sys.exit(main())
