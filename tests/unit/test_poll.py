"""rcopy.poll.until: the one wait-until-deadline loop (a lock, a device node, a last opener, a merge)."""
from rcopy import poll


def test_returns_the_first_answer_that_is_not_none_and_asks_no_more():
    answers = iter([None, None, 0, 5])
    asked = []

    def check():
        asked.append(1)
        return next(answers)

    assert poll.until(check, 60, 0) == 0                 # 0 (a file descriptor) is an answer, not "not yet"
    assert len(asked) == 3


def test_gives_none_after_the_deadline_having_asked_at_least_once_past_it(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(poll.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(poll.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    asked = []
    assert poll.until(lambda: asked.append(now[0]), 1.0, 0.3) is None
    assert [round(t, 6) for t in asked] == [100.0, 100.3, 100.6, 100.9, 101.2]   # the last past the deadline
