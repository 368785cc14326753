"""The group cut's ordering with fake dmsetup: every origin of every back-end suspended, then every
back-end's snapshots taken, then all resumed, then finished; and what a killed cut leaves is resumed."""
import os
import stat

import pytest

from rcopy.ports import Snapshot
from rcopy.snapshot import cut
from rcopy.sys import dmsetup


@pytest.fixture
def calls(monkeypatch):
    log = []
    monkeypatch.setattr(dmsetup, "suspend", lambda n, flush=True: log.append(("suspend", n)))

    def resume(n):
        log.append(("resume", n))
        if n == "bad":
            raise dmsetup.DmError("cannot resume bad")
    monkeypatch.setattr(dmsetup, "resume", resume)
    return log


def part(log, kind, names, fail=False):
    def take():
        if fail:
            raise KeyboardInterrupt          # SIGTERM/SIGINT land as this (rcopy.app.session)
        log.append(("take", kind))
    return cut.CutPart(list(names), take, lambda: log.append(("finish", kind)) or
                       [Snapshot(n, f"{n}.P1", f"/dev/{n}.P1", kind) for n in names])


def test_thin_and_thick_are_taken_inside_one_suspension(calls):
    snaps = cut.group_cut([part(calls, "thin", ["t1", "t2"]), part(calls, "cow", ["c1"])])
    assert calls == [("suspend", "t1"), ("suspend", "t2"), ("suspend", "c1"),     # every origin first
                     ("take", "thin"), ("take", "cow"),                          # then every snapshot
                     ("resume", "c1"), ("resume", "t2"), ("resume", "t1"),
                     ("finish", "thin"), ("finish", "cow")]
    assert [s.name for s in snaps] == ["t1.P1", "t2.P1", "c1.P1"]


def test_resumes_even_when_a_take_is_interrupted(calls):
    with pytest.raises(KeyboardInterrupt):
        cut.group_cut([part(calls, "thin", ["a"]), part(calls, "cow", ["b"], fail=True)])
    assert calls[-2:] == [("resume", "b"), ("resume", "a")]
    assert ("finish", "thin") not in calls


def test_resume_failure_does_not_skip_the_others(calls):
    with pytest.raises(dmsetup.DmError):
        cut.group_cut([part(calls, "x", ["a", "bad", "c"])])
    assert [c for c in calls if c[0] == "resume"] == [("resume", "c"), ("resume", "bad"), ("resume", "a")]


class Share:
    """A back-end whose snapshots exist (complete) or not."""

    def __init__(self, log, kind, done):
        self.log, self.kind, self.done = log, kind, done

    def existing(self, reqs):
        return [Snapshot(o, n, n, self.kind) for o, n in reqs] if self.done else None

    def prepare(self, reqs, idle=False):
        self.log.append(("prepare", self.kind))
        return part(self.log, self.kind, [o for o, _ in reqs])


def test_a_complete_cut_is_reused_but_a_partial_one_is_taken_again_everywhere(calls):
    done = cut.take([(Share(calls, "thin", True), [("t", "t.P1")]), (Share(calls, "cow", True), [("c", "c.P1")])])
    assert [s.name for s in done] == ["t.P1", "c.P1"] and calls == []
    cut.take([(Share(calls, "thin", True), [("t", "t.P1")]), (Share(calls, "cow", False), [("c", "c.P1")])])
    # the complete thin share is from another instant than the missing cow one: both are re-taken
    assert [c for c in calls if c[0] == "prepare"] == [("prepare", "thin"), ("prepare", "cow")]


def test_origins_left_suspended_are_found_in_sysfs_and_resumed(calls, tmp_path, monkeypatch):
    node = tmp_path / "origin"                        # a block device node: only its major:minor matters
    dev = os.makedev(253, 99)
    try:
        os.mknod(node, 0o600 | stat.S_IFBLK, dev)
    except PermissionError:
        pytest.skip("mknod of a block device node needs root")
    dm = tmp_path / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}" / "dm"
    dm.mkdir(parents=True)
    (dm / "name").write_text("vg-data\n")
    (dm / "suspended").write_text("1\n")
    real = dmsetup.suspended_name
    monkeypatch.setattr(dmsetup, "suspended_name", lambda p: real(p, sysfs=str(tmp_path)))
    assert dmsetup.resume_suspended([str(node), str(tmp_path / "not-a-device")]) == ["vg-data"]
    assert calls == [("resume", "vg-data")]
    (dm / "suspended").write_text("0\n")
    assert dmsetup.resume_suspended([str(node)]) == [] and calls == [("resume", "vg-data")]
