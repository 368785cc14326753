"""The group cut's ordering with fake dmsetup: all suspends, then all creates, then resume all."""
import pytest

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


def test_suspend_all_then_create_then_resume_all(calls):
    out = cut.group_cut(["a", "b", "a"], lambda: calls.append(("create",)) or "made")
    assert out == "made"
    assert calls == [("suspend", "a"), ("suspend", "b"), ("create",), ("resume", "b"), ("resume", "a")]


def test_resumes_even_when_create_fails(calls):
    def boom():
        raise RuntimeError("lvcreate failed")
    with pytest.raises(RuntimeError):
        cut.group_cut(["a", "b"], boom)
    assert calls[-2:] == [("resume", "b"), ("resume", "a")]


def test_resume_failure_does_not_skip_the_others(calls):
    with pytest.raises(dmsetup.DmError):
        cut.group_cut(["a", "bad", "c"], lambda: None)
    assert [c for c in calls if c[0] == "resume"] == [("resume", "c"), ("resume", "bad"), ("resume", "a")]
