"""What a group cut costs in LVM commands: LVM makes one LV per lvcreate, and nothing else may grow with
the volume count (each lvs read back, each activation ~0.25-1 s in the lab: an eight-volume thin group
spent 19 s in its cut on them); and what a cut makes of an interrupted one. A fake lvm process answers
from a fake VG; the real rcopy.sys.lvm, its report cache and both snapshotters run on it."""
import json
import shlex

import pytest

from rcopy.snapshot import cut
from rcopy.snapshot.cow import CowSnapshotter
from rcopy.snapshot.thin import ThinSnapshotter
from rcopy.sys import dmsetup, lvm, udev
from rcopy.sys.run import Result


class FakeLvm:
    """One VG ``vg0``: a thin pool, thin origins t*, thick origins c*; lvs, lvcreate and lvchange."""

    def __init__(self, thin: int, thick: int):
        self.log: list[tuple] = []
        self.rows = {"pool": self._row("pool", segtype="thin-pool", lv_attr="twi-aotz--", thin_id="")}
        for i in range(1, thin + 1):
            self.rows[f"t{i}"] = self._row(f"t{i}", thin_id=str(i))
        for i in range(1, thick + 1):
            self.rows[f"c{i}"] = self._row(f"c{i}", segtype="linear", lv_attr="-wi-a-----", pool_lv="", thin_id="")
        self.next_id = 100

    @staticmethod
    def _row(name, **over):
        row = {"vg_name": "vg0", "lv_name": name, "lv_path": f"/dev/vg0/{name}", "lv_dm_path": f"/dev/mapper/vg0-{name}",
               "lv_attr": "Vwi-a-tz--", "lv_size": str(64 << 20), "segtype": "thin", "origin": "", "pool_lv": "pool",
               "thin_id": "1", "chunk_size": "65536", "lv_active": "1", "lv_skip_activation": "0",
               "vg_extent_size": str(4 << 20), "vg_free": str(8 << 30), "data_percent": "10.00",
               "metadata_percent": "5.00"}
        row.update(over)
        return row

    def run(self, argv, timeout=None, **_):
        cmd, args = argv[1], list(argv[4:])          # lvm CMD --config X ARGS...
        self.log.append((cmd, *args))
        if cmd == "lvs":
            out = json.dumps({"report": [{"lv": list(self.rows.values())}]})
            return Result(tuple(argv), 0, out, "", 0.0)
        if cmd == "lvcreate":
            name, origin = args[args.index("-n") + 1], args[-1].split("/")[1]
            if "-L" in args:                          # classic snapshot: active at once
                self.rows[name] = self._row(name, segtype="linear", lv_attr="swi-a-s---", pool_lv="",
                                            thin_id="", origin=origin)
            else:
                self.next_id += 1
                inactive = "-ky" in args
                self.rows[name] = self._row(name, origin=origin, thin_id=str(self.next_id),
                                            lv_active="0" if inactive else "1",
                                            lv_skip_activation="1" if inactive else "0")
        elif cmd == "lvchange" and "-ay" in args:
            for full in (a for a in args if "/" in a):
                self.rows[full.split("/")[1]].update(lv_active="1", lv_skip_activation="0")
        return Result(tuple(argv), 0, "", "", 0.0)


@pytest.fixture
def fake(monkeypatch):
    def make(thin, thick):
        f = FakeLvm(thin, thick)
        monkeypatch.setattr(lvm.lvm_shell, "line", lambda argv: None)       # a process per command
        monkeypatch.setattr(lvm, "run", f.run)
        monkeypatch.setattr(dmsetup, "suspend", lambda n, flush=True: f.log.append(("suspend", n)))
        monkeypatch.setattr(dmsetup, "resume", lambda n: f.log.append(("resume", n)))
        monkeypatch.setattr(dmsetup, "message", lambda n, m, sector=0: f.log.append(("message", m)) or "")
        monkeypatch.setattr(udev, "wait_for", lambda path, **k: None)
        return f
    return make


@pytest.mark.parametrize("thin,thick", [(8, 0), (3, 2), (0, 3)])
def test_a_cut_runs_one_lvcreate_per_volume_and_a_fixed_number_of_other_commands(fake, thin, thick):
    f = fake(thin, thick)
    shares = [(ThinSnapshotter(), [(f"/dev/vg0/t{i}", f"rcopy.g.t{i}.P2") for i in range(1, thin + 1)]),
              (CowSnapshotter(), [(f"/dev/vg0/c{i}", f"rcopy.g.c{i}.P2") for i in range(1, thick + 1)])]
    with lvm.reports():
        snaps = cut.take([s for s in shares if s[1]], reuse=False)
    assert [s.path for s in snaps] == ([f"/dev/vg0/rcopy.g.t{i}.P2" for i in range(1, thin + 1)] +
                                       [f"/dev/vg0/rcopy.g.c{i}.P2" for i in range(1, thick + 1)])
    cmds = [c for c in f.log if c[0] in ("lvs", "lvcreate", "lvchange", "lvremove")]
    assert sum(c[0] == "lvcreate" for c in cmds) == thin + thick
    # one report before, one after the thin pre-creates (their device ids); none per volume
    assert sum(c[0] == "lvs" for c in cmds) == 1 + (thin > 0)
    activations = [c for c in cmds if c[0] == "lvchange"]
    assert activations == ([("lvchange", "-kn", "-ay", *[f"vg0/rcopy.g.t{i}.P2" for i in range(1, thin + 1)])]
                           if thin else [])
    # inside the suspension (the writers' pause): the thin pool messages and the thick lvcreates only
    first = next(i for i, c in enumerate(f.log) if c[0] == "suspend")
    last = max(i for i, c in enumerate(f.log) if c[0] == "resume")
    inside = f.log[first:last + 1]
    assert {c[0] for c in inside} <= {"suspend", "resume", "message", "lvcreate"}
    assert [c for c in inside if c[0] == "lvcreate"] == [c for c in cmds if c[0] == "lvcreate" and "-L" in c]
    assert [c[1].split()[0] for c in inside if c[0] == "message"] == ["delete", "create_snap"] * thin
    # every thin snapshot was pre-created inactive before the suspension, activated after the resume
    assert all(f.log.index(c) < first for c in cmds if c[0] == "lvcreate" and "-ky" in c)
    assert all(f.log.index(c) > last for c in activations)


def test_an_idle_cut_is_one_lvcreate_per_volume_and_nothing_else(fake):
    f = fake(2, 1)
    with lvm.reports():
        cut.take([(ThinSnapshotter(), [("/dev/vg0/t1", "rcopy.g.t1.R1"), ("/dev/vg0/t2", "rcopy.g.t2.R1")]),
                  (CowSnapshotter(), [("/dev/vg0/c1", "rcopy.g.c1.R1")])], reuse=False, idle=True)
    assert [c[0] for c in f.log] == ["lvs", "lvcreate", "lvcreate", "lvcreate"]      # no suspend, no lvs after
    assert [shlex.join(c[1:]) for c in f.log[1:3]] == ["-qq -s -kn -n rcopy.g.t1.R1 vg0/t1",
                                                       "-qq -s -kn -n rcopy.g.t2.R1 vg0/t2"]
    assert "-L" in f.log[3] and f.log[3][-3:] == ("-n", "rcopy.g.c1.R1", "vg0/c1")


def _cow_store(f, name, size):
    """What ``lvcreate -s`` stopped between its two commits leaves: a plain LV under the snapshot's name."""
    f.rows[name] = f._row(name, segtype="linear", lv_attr="-wi-a-----", pool_lv="", thin_id="", lv_size=str(size))


def _cow_size(name):
    from rcopy.sys.lvm import parse_lvs_json
    (o,) = parse_lvs_json(json.dumps({"report": [{"lv": [FakeLvm._row("c1", segtype="linear", lv_attr="-wi-a-----",
                                                                       pool_lv="", thin_id="")]}]}))
    return CowSnapshotter().cow_size(o, name)


@pytest.mark.parametrize("name", ["rcopy.g.c1.P2", "rcopy.g.c1.R1"])
def test_the_cow_store_an_interrupted_lvcreate_left_is_removed_and_the_snapshot_taken(fake, name):
    """Found by the fault campaign (term-primary): the next sync refused the group until someone
    removed the LV by hand."""
    f = fake(0, 1)
    _cow_store(f, name, _cow_size(name))
    with lvm.reports():
        (snap,) = cut.take([(CowSnapshotter(), [("/dev/vg0/c1", name)])], reuse=False, idle=name.endswith("R1"))
    removes = [c for c in f.log if c[0] == "lvremove"]
    assert removes == [("lvremove", "-qq", "-f", f"vg0/{name}")] and snap.path == f"/dev/vg0/{name}"
    assert f.log.index(removes[0]) < max(i for i, c in enumerate(f.log) if c[0] == "lvcreate")


@pytest.mark.parametrize("what", ["size", "open", "tags", "thin"])
def test_an_lv_under_a_snapshot_name_that_is_not_such_a_cow_store_is_refused_not_removed(fake, what):
    from rcopy.errors import Refused
    f = fake(0, 1)
    name = "rcopy.g.c1.P2"
    _cow_store(f, name, _cow_size(name) + (4 << 20 if what == "size" else 0))
    f.rows[name].update({"open": {"lv_device_open": "1"}, "tags": {"lv_tags": "mine"},
                         "thin": {"segtype": "thin", "lv_attr": "Vwi-a-tz--"}}.get(what, {}))
    with lvm.reports(), pytest.raises(Refused, match=f"{name} exists and is not a thick"):
        cut.take([(CowSnapshotter(), [("/dev/vg0/c1", name)])], reuse=False)
    assert not [c for c in f.log if c[0] in ("lvremove", "lvcreate")]


def test_sigterm_during_an_lvm_command_lets_it_finish_then_unwinds(fake, monkeypatch):
    """SIGTERM unwinds rcopy like Ctrl-C; raised mid-lvcreate it used to kill LVM between its commits."""
    import os
    import signal
    f = fake(0, 1)
    done = []
    plain = f.run

    def slow(argv, timeout=None, **k):
        if argv[1] == "lvcreate":
            os.kill(os.getpid(), signal.SIGTERM)           # arrives while LVM works
            done.append(argv[1])
        return plain(argv, timeout, **k)
    monkeypatch.setattr(lvm, "run", slow)

    def interrupt(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        with lvm.reports(), pytest.raises(KeyboardInterrupt):
            lvm.snapshot_now("vg0", "c1", "rcopy.g.c1.P2", size=8 << 20)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert done == ["lvcreate"] and "rcopy.g.c1.P2" in f.rows        # the command ran to its end first
    assert signal.getsignal(signal.SIGTERM) is old
