"""scripts/demo: rcopy replicating a group of a thin and a thick volume from `primary` to `backup`.

Boots (or reuses) the two-VM lab and starts it clean, then drives rcopy through its CLI as an admin
would: targets on both systems, a group (its mirror appears on the backup by itself), two volume pairs,
the initial full sync, random writes and a delta sync, `rcopy status` (human and --json), a link cut in
the middle of a sync (the backup rolls back, the primary keeps its base), `rcopy sync --dry-run` and a
delta resync once the link is back, and `rcopy verify`. It prints each command with its output (trimmed
where long), after each step what it proved with the numbers behind it (bytes changed vs sent, seconds
per phase, commands per side, lag), and at the end a table of claims. Exit 0 only if every claim held.

Secondaries are also hashed with sha256sum on the backup against the primary's snapshot of the same
sync point (LV rcopytest/rcopy.g.<volume>.P<n>), so the proofs do not rest on rcopy's own word.
RCOPY_LAB_KEEP=1 leaves the VMs running afterwards.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import time

VG, MIB, VOLS, BLOCK = "rcopytest", 64, ("thinvol", "thickvol"), 4096
FILL_MIB = 16                  # random data at the start of each volume before the initial sync
DELTA_BLOCKS = 200             # random 4 KiB blocks per volume before the delta sync
CUT_BLOCKS = 2000              # ... before the sync the link cut interrupts (so it lasts a while)
# The backup's agent gives up 20 s after the primary went silent mid-sync (default 200 s, 3PAR's target
# timeout), so the rollback shows within the demo; the same command tests/lab/test_replication.py uses.
AGENT = ("ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "
         "root@{link} env RCOPY_AGENT_TIMEOUT=20 rcopy agent")
NOT_BUILT = ("reverse --natural/--current and a power cut during a sync before failover are shown by the "
             "lab tests (tests/lab/test_dr.py), not by this demo")



def lvm_setup(vg: str, mib: int, pool_mib: int, zero: bool = False) -> str:
    """Shell script: VG on /dev/vdb, a thin pool (64 KiB chunks; zeroing new blocks or not) with thinvol,
    and thickvol."""
    return f"""set -e
pvcreate -qq -y -ff /dev/vdb >/dev/null
vgcreate -qq -s 1m {vg} /dev/vdb >/dev/null
lvcreate -qq -y -L {pool_mib}m -T {vg}/pool --chunksize 64k -Z{'y' if zero else 'n'} >/dev/null
lvcreate -qq -y -V {mib}m -T {vg}/pool -n thinvol >/dev/null
lvcreate -qq -y -Wy -Zy -L {mib}m -n thickvol {vg} >/dev/null
"""


# LVM's default pool (zeroing new blocks): the thin secondary then gets only what its primary holds
SETUP = lvm_setup(VG, MIB, 192, zero=True)
FILL = "; ".join(f"dd if=/dev/urandom of=/dev/{VG}/{v} bs=1M count={FILL_MIB} oflag=direct status=none"
                 for v in VOLS)
# Distinct random blocks (never block 0), fresh random data, O_DIRECT: each one is a changed 4 KiB block.
WRITE = """import mmap, os, random
rnd = random.Random({seed})
buf = mmap.mmap(-1, {block})
for v in {vols!r}:
    fd = os.open("/dev/{vg}/" + v, os.O_WRONLY | os.O_DIRECT)
    for i in sorted(rnd.sample(range(1, {nblocks}), {blocks})):
        buf.seek(0)
        buf.write(rnd.randbytes({block}))
        os.pwrite(fd, buf, i * {block})
    os.fsync(fd)
    os.close(fd)
"""
STATUS = "rcopy status --json && date +%s.%N"    # the guest's clock for the lag: now - last_sync_start
# Sectors written to the backup's secondaries so far (bash builtins but readlink: cheap enough to poll).
WRITTEN = ("w() { s=0; for v in " + " ".join(VOLS) + f"; do d=$(readlink -f /dev/{VG}/$v); "
           "read -r _ _ _ _ _ _ ws _ </sys/block/${d##*/}/stat; s=$((s + ws)); done; echo $s; }; ")
STALL_AT = 4 << 20      # bytes the primary sends in the link-cut step before its link goes silent
FAIL_WITHIN = 90       # seconds after the cut by which each side must have given up (design: ~25 s)


# --- bookkeeping (no lab needed: tests/unit/test_demo_script.py) ---------------------------------------
@dataclasses.dataclass(frozen=True)
class Claim:
    text: str
    ok: bool
    detail: str = ""


class Claims:
    """What the demo set out to prove, and whether it did. Exit 0 only if every claim held."""

    def __init__(self, say=print):
        self.items: list[Claim] = []
        self.say = say

    def claim(self, text: str, ok, detail: str = "") -> bool:
        c = Claim(text, bool(ok), detail)
        self.items.append(c)
        self.say(f"  => {'PROVED' if c.ok else 'FAILED'}: {text}" + ("" if c.ok or not detail else f"\n     ({detail})"))
        return c.ok

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.items if not c.ok]

    def exit_code(self) -> int:
        return 0 if self.items and not self.failed else 1

    def table(self) -> list[str]:
        lines = [f"  {'#':>2}  {'result':<6}  claim"]
        for i, c in enumerate(self.items, 1):
            lines.append(f"  {i:>2}  {'PROVED' if c.ok else 'FAILED':<6}  {c.text}")
            if not c.ok and c.detail:
                lines.append(f"  {'':>2}  {'':<6}    {c.detail}")
        return lines


class CommandFailed(Exception):
    """A command the demo needs failed: the demo stops there (every later step builds on it)."""

    def __init__(self, host: str, cmd: str, rc: int, output: str):
        self.host, self.cmd, self.rc, self.output = host, cmd, rc, output
        last = (output.strip().splitlines() or ["(no output)"])[-1]
        bug = looks_like_bug(output)
        super().__init__(f"{host}# {cmd} exited {rc}: {last}"
                         + (" -- this looks like a bug in rcopy, not in the demo" if bug else ""))


def looks_like_bug(output: str) -> bool:
    """rcopy prints 'internal error' (exit 1) for anything that is not one of its own errors."""
    return "internal error" in output or "Traceback (most recent call last)" in output


def trim(text: str, head: int = 14, tail: int = 4) -> list[str]:
    lines = text.rstrip().splitlines()
    if len(lines) <= head + tail + 1:
        return lines
    return lines[:head] + [f"... ({len(lines) - head - tail} lines trimmed)"] + lines[-tail:]


def size(n: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def phases(report: dict) -> str:
    p = report.get("phases") or {}
    return " + ".join(f"{k} {p[k]:.1f}" for k in ("begin", "cut", "send", "commit") if k in p)


def excerpt(g: dict) -> dict:
    """The part of a group's `rcopy status --json` the demo talks about."""
    rep = g.get("last_sync") or {}
    out = {"role": g["role"], "state": g["state"], "reason": g["reason"], "sync_point": g["sync_point"], "syncing": g["syncing"],
           "syncing_generation": g["syncing_generation"],
           "volumes": [{k: v[k] for k in ("name", "backend", "state", "bytes_sent", "bytes_done", "full_reason") if k in v}
                       for v in g["volumes"]]}
    if rep:
        out["last_sync"] = {k: rep[k] for k in ("generation", "seconds", "phases", "commands", "peer_commands",
                                                "processes", "peer_processes", "commands_by_tool", "plan") if k in rep}
    return out


def dumps(obj: dict) -> list[str]:
    """An excerpt as JSON lines a reader can follow: one line per key, per volume and per plan step."""
    lines = ["{"]
    for i, (k, v) in enumerate(obj.items()):
        end = "," if i < len(obj) - 1 else ""
        if isinstance(v, list) and v and isinstance(v[0], dict):
            lines += [f'  "{k}": ['] + [f"    {json.dumps(x)}" + ("," if j < len(v) - 1 else "")
                                         for j, x in enumerate(v)] + [f"  ]{end}"]
        elif isinstance(v, dict) and any(isinstance(x, (list, dict)) for x in v.values()):
            lines.append(f'  "{k}": {{')
            for j, (kk, vv) in enumerate(v.items()):
                e = "," if j < len(v) - 1 else ""
                if isinstance(vv, list) and len(vv) > 1:
                    lines += [f'    "{kk}": ['] + [f"      {json.dumps(x)}" + ("," if m < len(vv) - 1 else "")
                                                    for m, x in enumerate(vv)] + [f"    ]{e}"]
                else:
                    lines.append(f'    "{kk}": {json.dumps(vv)}{e}')
            lines.append(f"  }}{end}")
        else:
            lines.append(f'  "{k}": {json.dumps(v)}{end}')
    return lines + ["}"]


@dataclasses.dataclass
class SyncRow:
    """One line of the numbers table at the end."""
    point: int
    kind: str
    changed: int          # bytes changed per volume since the previous sync point (written by the demo)
    sent: list            # bytes sent per volume
    seconds: float
    phases: str
    commands: str
    lag: float | None     # now - start of the sync point the backup holds


# --- the demo ---------------------------------------------------------------------------------------
class Demo:
    def __init__(self, lab, say=None):
        self.lab = lab
        self.say = say or (lambda msg="": print(msg, flush=True))
        self.claims = Claims(self.say)
        self.rows: list[SyncRow] = []
        self.t0 = time.monotonic()   # main() resets it once the lab is up

    # helpers ----------------------------------------------------------------------------------------
    def step(self, title: str):
        self.say(f"\n=== {title} " + "=" * max(3, 96 - len(title)))

    def sh(self, host: str, cmd: str, *, label: str | None = None, show: bool = True, check: bool = True,
           input: str | None = None, head: int = 14, tail: int = 4, timeout: float = 900):
        """Run cmd in host; print 'host# cmd' (or label), its output trimmed, and how long it took."""
        if show:
            self.say(f"{host}# {label or cmd}")
        t = time.monotonic()
        r = self.lab.run(host, cmd, check=False, input=input, timeout=timeout)
        took = time.monotonic() - t
        out = (r.stdout + r.stderr).rstrip()
        if show:
            for line in trim(out, head, tail) if out else []:
                self.say("    " + line)
            self.say(f"    [{took:.1f} s" + (f", exit {r.returncode}]" if r.returncode else "]"))
        if r.returncode and (check or looks_like_bug(out)):
            if not show:
                self.say(f"{host}# {label or cmd}\n" + "\n".join("    " + l for l in trim(out)))
            raise CommandFailed(host, label or cmd, r.returncode, out)
        return r

    def status(self, host: str = "primary", show: str = "") -> tuple[dict, float]:
        """The group g from `rcopy status --json` on host, and the host's clock when it answered.
        show: "" prints nothing, "excerpt" the trimmed JSON, "line" one line of the facts."""
        r = self.sh(host, STATUS, show=False)
        text, _, now = r.stdout.rstrip().rpartition("\n")
        try:
            g = next(g for g in json.loads(text)["groups"] if g["name"] == "g")
            now = float(now)
        except (ValueError, LookupError, StopIteration, TypeError):
            raise CommandFailed(host, "rcopy status --json", r.returncode,
                                f"no group g in what it printed: {r.stdout[-300:]!r}") from None
        if show == "excerpt":
            self.say(f"{host}# rcopy status --json    (excerpt: group g)")
            for line in dumps(excerpt(g)):
                self.say("    " + line)
        elif show == "line":
            vols = ", ".join(f"{v['name']} {v['state']}" + (f" {v['percent']}%" if v["state"] == "syncing" else "")
                             for v in g["volumes"])
            self.say(f"{host}# rcopy status --json    -> state {g['state']}, sync point "
                     f"{g['sync_point']['generation']}, syncing {str(g['syncing']).lower()}"
                     f" (generation {g['syncing_generation']}); {vols}"
                     + (f"; reason: {g['reason']}" if g["reason"] else ""))
        return g, now

    def write(self, blocks: int, seed: int) -> int:
        """Random 4 KiB blocks on every primary volume; returns the bytes changed per volume."""
        self.sh("primary", "python3 -", input=WRITE.format(seed=seed, vols=list(VOLS), vg=VG, nblocks=MIB * 256,
                                                            blocks=blocks, block=BLOCK),
                label=f"python3: write {blocks} random 4 KiB blocks (O_DIRECT) at random places of each volume")
        return blocks * BLOCK

    def hashes(self, gen: int) -> dict:
        """sha256 of every secondary (on backup) and of P<gen> (on primary), both VMs at once."""
        snaps = " ".join(f"/dev/{VG}/rcopy.g.{v}.P{gen}" for v in VOLS)
        secs = " ".join(f"/dev/{VG}/{v}" for v in VOLS)
        cmds = {"primary": f"sha256sum {snaps}", "backup": f"sync; echo 3 >/proc/sys/vm/drop_caches; sha256sum {secs}"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futs = {h: pool.submit(self.lab.run, h, c, check=False, timeout=600) for h, c in cmds.items()}
            res = {h: f.result() for h, f in futs.items()}
        got = {}
        for h, r in res.items():
            self.say(f"{h}# {cmds[h]}")
            for line in r.stdout.splitlines():
                digest, path = line.split()
                self.say(f"    {digest[:16]}...  {path}")
                name = path.rsplit("/", 1)[1]                        # thinvol, or rcopy.g.thinvol.P3
                got[(h, name.split(".")[2] if name.startswith("rcopy.") else name)] = digest
            if r.returncode:
                raise CommandFailed(h, cmds[h], r.returncode, r.stdout + r.stderr)
        return {v: (got.get(("primary", v)), got.get(("backup", v))) for v in VOLS}

    def prove_equal(self, gen: int, when: str) -> bool:
        pairs = self.hashes(gen)
        ok = all(p and p == b for p, b in pairs.values())
        return self.claims.claim(f"{when}: every secondary (sha256 on backup) equals the primary snapshot of sync "
                                 f"point {gen} (rcopy.g.<volume>.P{gen})", ok,
                                 "" if ok else f"sha256 primary vs backup: {pairs}")

    def numbers(self, g: dict, now: float, kind: str, changed: int) -> SyncRow:
        """Print the figures of the sync that just committed and keep a row for the final table."""
        rep = g["last_sync"]
        sent = [v["bytes_sent"] for v in g["volumes"]]
        lag = now - g["last_sync_start"] if g["last_sync_start"] else None
        by_tool = ", ".join(f"{k} {n}" for k, n in sorted(rep.get("commands_by_tool", {}).items()))
        row = SyncRow(g["sync_point"]["generation"], kind, changed, sent, rep.get("seconds", 0.0), phases(rep),
                      f"{rep.get('commands', '-')}/{rep.get('peer_commands', '-')}", lag)
        self.rows.append(row)
        per_vol = "; ".join(f"{v['name']}: {size(changed)} changed, {size(v['bytes_sent'])} sent"
                            + (f" ({v['bytes_sent'] / changed:.2f}x)" if changed else "")
                            + (f", full: {v['full_reason']}" if v["full_reason"] else ", delta")
                            for v in g["volumes"])
        self.say(f"  numbers: sync point {row.point}: {per_vol}")
        self.say(f"           {row.seconds:.1f} s = {row.phases} (seconds per phase); commands run: primary "
                 f"{rep.get('commands', '-')} ({by_tool}), backup {rep.get('peer_commands', '-')}")
        if lag is not None:
            self.say(f"           lag now: {lag:.0f} s (primary clock now - start of sync point {row.point}, "
                     f"the point the backup holds)")
        return row

    # the story ----------------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        self.initial_sync()
        self.delta_sync()
        self.link_cut()
        self.disaster()

    def setup(self) -> None:
        self.step("1. two systems, a thin and a thick volume on each, targets both ways, a group")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(self.sh, h, "bash -s", input=SETUP, show=False, label="bash: create the VG and LVs")
                      for h in ("primary", "backup")]:
                f.result()
        self.say(f"demo: on primary and backup: VG {VG} on /dev/vdb, thin LV thinvol (pool with 64 KiB chunks) "
                 f"and thick LV thickvol, {MIB} MiB each; the backup's are empty")
        self.sh("primary", FILL, label=f"dd {FILL_MIB} MiB of random data onto the start of thinvol and of thickvol")
        self.sh("primary", f"rcopy target create backup --link backup --agent '{AGENT}'")
        self.say("demo: (--agent: the backup's agent gives up 20 s after the primary went silent, instead of 200 s)")
        self.sh("backup", "rcopy target create primary --link primary")
        self.sh("primary", "rcopy group create g --target backup --policy auto_recover,over_per_alert")
        g, _ = self.status("backup", show="excerpt")
        self.claims.claim("`rcopy group create` on primary made the group appear on backup by itself, role "
                          f"secondary (state {g['state']})", (g["name"], g["role"]) == ("g", "secondary"))
        for v in VOLS:
            self.sh("primary", f"rcopy group admit g /dev/{VG}/{v} backup:/dev/{VG}/{v}")

    def initial_sync(self) -> None:
        self.step("2. initial sync: `group start --wait` copies each volume whole (zeroes as write-zeroes)")
        self.sh("primary", "rcopy group start g --wait", head=4, tail=3)
        g, now = self.status("primary", show="excerpt")
        self.numbers(g, now, "initial (full)", FILL_MIB << 20)
        sent = [v["bytes_sent"] for v in g["volumes"]]
        self.claims.claim(f"initial sync committed sync point 1 with both volumes full ('initial sync'), "
                          f"{size(sum(sent))} sent for {size(2 * MIB << 20)} of volumes: only the {FILL_MIB} MiB "
                          f"of data per volume travel as data, the {MIB - FILL_MIB} MiB of zeroes as write-zeroes",
                          g["state"] == "started" and g["sync_point"]["generation"] == 1
                          and all(v["full_reason"] == "initial sync" for v in g["volumes"])
                          and sent == [FILL_MIB << 20] * len(VOLS), f"status: {excerpt(g)}")
        used = {h: float(self.sh(h, f"lvs --noheadings -o data_percent {VG}/thinvol", show=False).stdout)
                for h in ("primary", "backup")}
        self.say(f"demo: thinvol allocates {used['primary']:.1f} % of its {MIB} MiB on primary, its secondary "
                 f"{used['backup']:.1f} % on backup")
        self.claims.claim(f"the thin secondary holds what its primary holds ({used['backup']:.1f} % of {MIB} MiB "
                          f"allocated, primary {used['primary']:.1f} %): its zero runs unmapped pool blocks "
                          f"instead of writing zeroes into them",
                          used["backup"] <= used["primary"] + 1, f"{used}")

    def delta_sync(self) -> None:
        self.step("3. writes, then a delta sync: only the changed blocks travel")
        changed = self.write(DELTA_BLOCKS, seed=1)
        self.sh("primary", "rcopy sync g --wait")
        g, now = self.status("primary", show="excerpt")
        self.numbers(g, now, "delta", changed)
        vols = g["volumes"]
        self.claims.claim(f"delta sync 2: {DELTA_BLOCKS} random 4 KiB blocks ({size(changed)}) written per volume, "
                          f"{' and '.join(size(v['bytes_sent']) for v in vols)} sent (thin via thin_delta, thick via "
                          f"the dm-snapshot COW table, both refined to 4 KiB), not {MIB} MiB",
                          g["sync_point"]["generation"] == 2 and all(v["full_reason"] == "" for v in vols)
                          and all(changed <= v["bytes_sent"] <= 2 * changed for v in vols), f"status: {excerpt(g)}")
        rep = g["last_sync"]
        self.claims.claim(f"the sync's report gives seconds per phase ({phases(rep)} of {rep.get('seconds', 0):.1f} s) "
                          f"and commands per side (primary {rep.get('commands')}, backup {rep.get('peer_commands')}; "
                          f"processes started {rep.get('processes')} and {rep.get('peer_processes')}: LVM's "
                          f"commands ran in one lvm shell per side)",
                          set(rep.get("phases", {})) == {"begin", "cut", "send", "commit"}
                          and rep.get("commands", 0) > 0 and rep.get("peer_commands", 0) > 0
                          and rep.get("processes", 0) < rep["commands"]
                          and (rep.get("peer_processes") or 0) < rep["peer_commands"])
        self.prove_equal(2, "after delta sync 2")
        # nothing written since: no snapshot, no send, sync point 2 confirmed current (the lag restarts)
        t = time.monotonic()
        self.sh("primary", "rcopy sync g --wait", label="rcopy sync g --wait    (nothing written since sync point 2)")
        took = time.monotonic() - t
        q, _ = self.status("primary")
        rep = q["last_sync"]
        self.claims.claim(f"a sync with nothing written confirms sync point 2 current in {took:.1f} s: no snapshot, "
                          f"nothing sent, {rep.get('commands')} commands on the primary "
                          f"({', '.join(f'{k} {v}' for k, v in sorted(rep.get('commands_by_tool', {}).items()))}), "
                          f"lag restarted: {q.get('lag_seconds')} s",
                          bool(rep.get("confirmed")) and q["sync_point"]["generation"] == 2
                          and rep.get("bytes_sent") == 0 and q["sync_point"]["cut"] > g["sync_point"]["cut"]
                          and not {"lvcreate", "lvremove"} & set(rep.get("commands_by_tool", {})), f"status: {excerpt(q)}")
        self.sh("primary", "rcopy status", head=12, tail=0)

    def link_cut(self) -> None:
        g0, _ = self.status("primary")
        n = g0["sync_point"]["generation"]
        start_n = g0["last_sync_start"]
        self.step(f"4. the link is cut in the middle of sync point {n + 1}: the backup rolls back to {n}")
        changed = self.write(CUT_BLOCKS, seed=2)
        base = int(self.sh("backup", WRITTEN + "w", show=False).stdout)
        # The cut must land inside the transfer however fast this machine runs the lab: the guest itself
        # watches what the primary has sent and drops everything from STALL_AT bytes on (lab.stall_after,
        # as the lab tests do). Polling `rcopy status` from here to decide when to cut raced the transfer:
        # a poll took 4-5 s on a busy machine and the sync had committed before the cut.
        self.say("demo: lab.throttle: the primary's link limited to 16 Mbit/s for this step (tc counts what it sends)")
        self.lab.throttle("primary", "16mbit")
        self.sh("primary", "rm -f /tmp/demo-sync.rc; nohup sh -c 'rcopy sync g --wait; echo $? >/tmp/demo-sync.rc' "
                           "</dev/null >/tmp/demo-sync.out 2>&1 & echo $! >/tmp/demo-sync.pid",
                label="rcopy sync g --wait &    (in the background)")
        t = time.monotonic()
        self.say(f"demo: lab.stall_after: once the primary has sent {size(STALL_AT)} on the link, "
                 "the link drops all it sends (checked in the guest every 0.1 s)")
        stalled = self.lab.stall_after("primary", STALL_AT, "/tmp/demo-sync.pid", timeout=600)
        # what the backup acknowledged of sync point n+1 before the stall (the primary's progress in its state)
        g, _ = self.status("primary", show="line")
        acked = sum(v.get("bytes_done") or 0 for v in g["volumes"]) if g["syncing"] else 0
        self.say(f"demo: the backup has acknowledged {size(acked)} of sync point {n + 1}")
        arriving = stalled and g["syncing"] and acked > 0
        self.say(f"demo: lab.link(False): cutting the replication link (both NICs lose carrier), "
                 f"{time.monotonic() - t:.0f} s after the sync started")
        self.lab.link(False)
        cut = time.monotonic()
        got = (int(self.sh("backup", WRITTEN + "w", show=False).stdout) - base) * 512
        self.claims.claim(f"the link went down while sync point {n + 1} was in flight: blocks were landing on the "
                          f"backup, {size(acked)} of its {size(2 * changed)} acknowledged",
                          arriving and acked < 2 * changed,
                          f"status when cut: {excerpt(g)}; {got} bytes written on backup's devices")
        # Both sides on their own: the primary's sync must fail, the backup's agent must give up and roll back.
        waits = {
            "primary": ("for i in $(seq 900); do [ -e /tmp/demo-sync.rc ] && break; sleep 1; done; "
                        "cat /tmp/demo-sync.out; echo \"exit status: $(cat /tmp/demo-sync.rc)\"",
                        "wait until the background sync ends; its output and exit status"),
            "backup": ("for i in $(seq 900); do rcopy status --json >/tmp/b.json && grep -q '\"syncing_generation\": 0' "
                       "/tmp/b.json && break; sleep 1; done; cat /tmp/b.json",
                       "until rcopy status --json shows \"syncing_generation\": 0; do sleep 1; done"),
        }

        def wait(host):
            res = self.lab.run(host, waits[host][0], check=False, timeout=1000)
            return res, time.monotonic() - cut
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futs = {h: pool.submit(wait, h) for h in waits}
            done = {h: f.result() for h, f in futs.items()}
        for h in sorted(done, key=lambda h: done[h][1]):
            res, after = done[h]
            self.say(f"{h}# {waits[h][1]}")
            if h == "primary":
                for line in trim(res.stdout, 4, 3):
                    self.say("    " + line)
            self.say(f"    [done {after:.0f} s after the cut]")
        r, failed_after = done["primary"]
        rc = r.stdout.strip().rsplit("exit status:", 1)[-1].strip()
        if looks_like_bug(r.stdout):
            raise CommandFailed("primary", "rcopy sync g --wait", int(rc or 1), r.stdout)
        self.claims.claim(f"the primary's sync failed by itself {failed_after:.0f} s after the cut (exit {rc}); "
                          f"rcopy/DESIGN.md §2.9: ~25 s of link silence fails a sync (the demo allows {FAIL_WITHIN} s)",
                          rc not in ("", "0") and failed_after <= FAIL_WITHIN, r.stdout.strip()[-400:])
        rb, rolled = done["backup"]
        try:
            b = json.loads(rb.stdout)["groups"][0]
        except (ValueError, LookupError):
            raise CommandFailed("backup", "rcopy status --json", rb.returncode, rb.stdout + rb.stderr) from None
        self.say("backup# cat /tmp/b.json    (excerpt: group g)")
        for line in dumps(excerpt(b)):
            self.say("    " + line)
        self.claims.claim(f"the backup gave up on sync point {n + 1} by itself and rolled back {rolled:.0f} s after "
                          f"the cut (agent timeout 20 s; the demo allows {FAIL_WITHIN} s): at sync point "
                          f"{b['sync_point']['generation']}, nothing in flight",
                          b["sync_point"]["generation"] == n and b["syncing_generation"] == 0 and rolled <= FAIL_WITHIN,
                          f"backup status: {excerpt(b)}")
        g, now = self.status("primary", show="line")
        at = time.monotonic()
        self.claims.claim(f"on primary the group is stopped with its reason and still at sync point {n}",
                          g["state"] == "stopped" and g["reason"] and g["sync_point"]["generation"] == n,
                          f"status: {excerpt(g)}")
        lvs = self.sh("primary", f"lvs --noheadings -o lv_name {VG}").stdout.split()
        keep = [f"rcopy.g.{v}.P{n}" for v in VOLS]
        drop = [f"rcopy.g.{v}.P{n + 1}" for v in VOLS]
        self.claims.claim(f"the primary kept its base P{n} of both volumes and dropped the half-sent P{n + 1}",
                          all(k in lvs for k in keep) and not any(d in lvs for d in drop), f"lvs: {lvs}")
        equal = self.prove_equal(n, "after the rollback (link still down)")
        lag = now + (time.monotonic() - at) - start_n
        self.say(f"  numbers: {size(changed)} changed per volume since sync point {n}; {size(got)} of sync point "
                 f"{n + 1} had landed and were rolled back; lag with the link down: {lag:.0f} s (now - start of "
                 f"sync point {n}) and growing until a sync commits")
        self.rows.append(SyncRow(n + 1, "cut mid-sync: rolled back", changed, [], 0.0, "", "", lag))
        if equal:
            self.say(f"  => so the group as a whole reads as sync point {n} on the backup, never a mix of {n} and {n + 1}")

        self.step(f"5. link up: the next sync is again a delta from P{n}")
        self.say("demo: lab.link(True): the replication link is back")
        self.lab.throttle("primary", None)
        self.lab.link(True)
        dry = self.sh("primary", "rcopy sync g --dry-run").stdout.strip().splitlines()
        deltas = [l for l in dry if "send blocks changed between rcopy.g." in l and f".P{n} and" in l]
        self.claims.claim(f"after the failed attempt, `rcopy sync --dry-run` plans a delta from P{n} for both volumes",
                          len(deltas) == len(VOLS), "\n".join(dry))
        self.sh("primary", "rcopy sync g --wait", head=4, tail=3)
        g, now = self.status("primary", show="excerpt")
        self.numbers(g, now, "delta after link up", changed)
        vols = g["volumes"]
        self.claims.claim(f"the resync after link up committed sync point {n + 1} by delta (full_reason \"\" for both): "
                          f"{' and '.join(size(v['bytes_sent']) for v in vols)} sent for {size(changed)} changed per "
                          f"volume, not {MIB} MiB", g["state"] == "started" and g["sync_point"]["generation"] == n + 1
                          and all(v["full_reason"] == "" for v in vols)
                          and all(changed <= v["bytes_sent"] <= 2 * changed for v in vols), f"status: {excerpt(g)}")
        self.claims.claim("the plan that ran (last_sync.plan in status) is the plan --dry-run printed",
                          g["last_sync"].get("plan") == dry,
                          f"dry-run {dry} vs executed {g['last_sync'].get('plan')}")
        r = self.sh("primary", "rcopy verify g", check=False)
        self.claims.claim(f"`rcopy verify g`: every secondary equals sync point {n + 1} (sha256 on each side, "
                          "compared over the control channel)",
                          r.returncode == 0 and f"every secondary equals sync point {n + 1}" in r.stdout,
                          (r.stdout + r.stderr).strip()[-300:])
        if looks_like_bug(r.stdout + r.stderr):
            raise CommandFailed("primary", "rcopy verify g", r.returncode, r.stdout + r.stderr)

    def disaster(self) -> None:
        """Power cut of primary, failover on backup, writes there, recover by delta (the primary's own
        un-replicated writes kept as K), restore, and replication in the natural direction again."""
        self.step("5. disaster: primary loses power with un-replicated writes; backup fails over")
        g, _ = self.status("primary")
        n = g["sync_point"]["generation"]
        point = {v: b for v, (_, b) in self.hashes(n).items()}
        self.write(DELTA_BLOCKS, seed=50)
        lost = self.sh("primary", f"sha256sum /dev/{VG}/thinvol /dev/{VG}/thickvol", label="sha256sum of both "
                       "volumes on primary (its writes since the last sync point)").stdout.split()[0::2]
        self.say("demo: power cut of primary (qemu killed)")
        self.lab.crash("primary")
        out = self.sh("backup", "rcopy group failover g -f").stdout
        g, _ = self.status("backup", show="line")
        now = self.sh("backup", f"sha256sum /dev/{VG}/thinvol /dev/{VG}/thickvol", show=False).stdout.split()[0::2]
        self.claims.claim(f"failover on backup: role primary-rev, volumes writable and exactly at sync point {n} "
                          "(sha256), the unreachable primary noted as not fenced yet",
                          g["role"] == "primary-rev" and now == [point[v] for v in VOLS] and "not fenced now" in out,
                          f"role {g['role']}, sha {now} vs {point}")
        self.sh("backup", "python3 -", input=WRITE.format(seed=51, vols=list(VOLS), vg=VG, nblocks=MIB * 256,
                                                           blocks=DELTA_BLOCKS, block=BLOCK),
                label=f"python3: the applications now run on backup: {DELTA_BLOCKS} random 4 KiB blocks per volume")
        self.step("6. primary is back: recover (failback by delta), then restore the natural direction")
        self.lab.start("primary")
        r = self.sh("primary", "rcopy sync g --wait", check=False)
        self.claims.claim("the returning primary fences itself: its sync is refused (exit 17), nothing is sent",
                          r.returncode == 17, (r.stdout + r.stderr).strip()[-200:])
        self.sh("backup", "rcopy group recover g -f", head=6, tail=3)
        g, now_t = self.status("backup", show="excerpt")
        self.numbers(g, now_t, "recover (reverse delta)", DELTA_BLOCKS * BLOCK)
        a, _ = self.status("primary")
        changed = DELTA_BLOCKS * BLOCK
        self.claims.claim(f"recover: primary is secondary-rev; only the backup's changes travelled back "
                          f"({' and '.join(size(v['bytes_sent']) for v in g['volumes'])} for {size(changed)} "
                          f"written per volume, not {MIB} MiB)",
                          a["role"] == "secondary-rev" and all(v["full_reason"] == "" and v["bytes_sent"] <= 2 * changed
                                                               for v in g["volumes"]), f"{excerpt(g)}")
        kept = [f"rcopy.g.{v}.K{n}" for v in VOLS]
        self.sh("primary", f"lvchange -ay -K {VG}/{kept[0]}", show=False, check=False)
        got = self.sh("primary", " ".join(["sha256sum"] + [f"/dev/{VG}/{k}" for k in kept]),
                      label="sha256sum of the kept snapshots K on primary").stdout.split()[0::2]
        self.claims.claim(f"the primary's un-replicated writes are kept, not discarded (3PAR would): "
                          f"{', '.join(kept)} hash-equal the volumes just before the power cut, and status lists them",
                          got == lost and sorted(x for names in a["kept"].values() for x in names) == sorted(kept),
                          f"{got} vs {lost}; kept {a['kept']}")
        self.sh("backup", "rcopy group restore g -f", head=6, tail=3)
        a, _ = self.status("primary", show="line")
        b, _ = self.status("backup")
        self.claims.claim("restore: natural roles again (primary / secondary), the final sync a delta",
                          (a["role"], b["role"]) == ("primary", "secondary")
                          and all(v["full_reason"] == "" for v in b["volumes"]), f"{a['role']}/{b['role']}")
        self.write(DELTA_BLOCKS // 4, seed=52)
        self.sh("primary", "rcopy sync g --wait", head=4, tail=3)
        g, now_t = self.status("primary")
        self.numbers(g, now_t, "natural direction again", DELTA_BLOCKS // 4 * BLOCK)
        r = self.sh("primary", "rcopy verify g", check=False)
        self.claims.claim("after the round trip a delta sync from primary and `rcopy verify` pass: no full copy "
                          "anywhere since the initial sync",
                          r.returncode == 0 and all(v["full_reason"] == "" for v in g["volumes"]),
                          (r.stdout + r.stderr).strip()[-300:])

    def report(self) -> list[str]:
        lines = ["", f"demo: numbers per sync point ({MIB} MiB volumes; lag = primary clock - start of the sync "
                     "point the backup holds, read right after the sync)",
                 f"  {'point':>5}  {'what':<26} {'changed/vol':>11}  {'sent thin, thick':>20}  {'seconds':>7}  "
                 f"{'phases (begin + cut + send + commit)':<40} {'cmds P/B':>8}  {'lag':>5}"]
        for r in self.rows:
            sent = ", ".join(size(s) for s in r.sent) if r.sent else "-"
            lines.append(f"  {r.point:>5}  {r.kind:<26} {size(r.changed):>11}  {sent:>20}  "
                         f"{(f'{r.seconds:.1f}' if r.seconds else '-'):>7}  {r.phases or '-':<40} {r.commands or '-':>8}  "
                         f"{(f'{r.lag:.0f} s' if r.lag is not None else '-'):>5}")
        return lines


def main() -> int:
    from rcopylab.labctl import Lab
    from rcopy.errors import RcopyError

    say = lambda msg="": print(msg, flush=True)   # noqa: E731
    lab = Lab(log=say)
    demo = Demo(lab, say)
    stopped = ""
    t0 = time.monotonic()
    try:
        say("demo: the two-VM lab (primary, backup), reused if it is up, with the working tree's rcopy installed")
        lab.ensure_up()
        lab.reset()
        demo.t0 = time.monotonic()
        demo.run()
    except CommandFailed as e:
        stopped = str(e)
    except RcopyError as e:   # the lab itself (boot, ssh, timeouts)
        stopped = str(e)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except Exception as e:   # a bug in the demo (or rcopy's output changed shape): still a clear FAILED
        stopped = f"internal error of the demo: {type(e).__name__}: {e}"
    finally:
        if not os.environ.get("RCOPY_LAB_KEEP"):
            try:
                lab.down()
            except Exception as e:   # never hide the demo's own outcome behind a failed stop
                say(f"demo: could not stop the lab: {e}")
    if stopped:
        demo.claims.claim("the demo ran to its end", False, stopped)
    for line in demo.report():
        say(line)
    good = len(demo.claims.items) - len(demo.claims.failed)
    say(f"\ndemo: {good} of {len(demo.claims.items)} claims PROVED in {time.monotonic() - demo.t0:.0f} s "
        f"(+{demo.t0 - t0:.0f} s to start, update and reset the lab)")
    for line in demo.claims.table():
        say(line)
    say(f"demo: {NOT_BUILT}")
    if stopped:
        say(f"demo: stopped early: {stopped}")
    return 130 if stopped == "interrupted" else demo.claims.exit_code()


if __name__ == "__main__":
    sys.exit(main())
