"""scripts/demo without the lab: it runs the replication demo, whose claim bookkeeping exits non-zero
when any claim fails or a step stops it, and which names an rcopy internal error as a bug."""
from pathlib import Path

from rcopylab import replication_demo as demo
from rcopylab.labctl import GuestResult

REPO = Path(__file__).resolve().parents[2]


def test_scripts_demo_runs_the_replication_demo():
    text = (REPO / "scripts" / "demo").read_text()
    assert "-m rcopylab.replication_demo" in text
    assert "scripts/setup" in text and "scripts/lab build" in text


def test_every_claim_proved_exits_0():
    c = demo.Claims(say=lambda *_: None)
    c.claim("a", True)
    c.claim("b", 1)
    assert c.exit_code() == 0 and not c.failed


def test_one_failed_claim_exits_non_zero_and_shows_in_the_table():
    said = []
    c = demo.Claims(say=said.append)
    c.claim("a", True)
    c.claim("b", False, "because")
    assert c.exit_code() == 1
    assert [x.text for x in c.failed] == ["b"]
    assert any("FAILED: b" in s for s in said)
    table = "\n".join(c.table())
    assert "PROVED  a" in table and "FAILED  b" in table and "because" in table


def test_no_claim_at_all_is_a_failure():
    assert demo.Claims(say=lambda *_: None).exit_code() == 1


def test_trim_keeps_head_and_tail():
    text = "\n".join(str(i) for i in range(100))
    lines = demo.trim(text, head=3, tail=2)
    assert lines == ["0", "1", "2", "... (95 lines trimmed)", "98", "99"]
    assert demo.trim("a\nb", head=3, tail=2) == ["a", "b"]


def test_internal_error_is_reported_as_a_bug_in_rcopy():
    e = demo.CommandFailed("primary", "rcopy sync g", 1, "rcopy: internal error: KeyError: 'x' (rerun with --debug)")
    assert "bug in rcopy" in str(e) and "rcopy sync g exited 1" in str(e)
    assert "bug" not in str(demo.CommandFailed("primary", "rcopy sync g", 10, "rcopy: error: backup unreachable"))


def test_excerpt_is_json():
    import json
    g = {"state": "started", "reason": "", "sync_point": {"generation": 2, "id": "ab"}, "syncing": False,
         "syncing_generation": 0, "last_sync_start": 1.0, "role": "primary",
         "volumes": [{"name": "thinvol", "backend": "thin", "state": "synced", "bytes_sent": 4096,
                      "full_reason": "", "size": 1}],
         "last_sync": {"generation": 2, "seconds": 1.5, "phases": {"begin": 1.0}, "commands": 3,
                       "peer_commands": 4, "commands_by_tool": {"lvs": 3}, "plan": ["1. a", "2. b"]}}
    assert json.loads("\n".join(demo.dumps(demo.excerpt(g))))["last_sync"]["plan"] == ["1. a", "2. b"]


class FailingLab:
    """A lab whose every command fails the way a bug in rcopy does."""

    def __init__(self, log=print):
        self.downs = 0

    def ensure_up(self):
        pass

    def reset(self):
        pass

    def down(self):
        self.downs += 1

    def run(self, host, cmd, check=True, input=None, timeout=300):
        return GuestResult(host, cmd, 1, "", "rcopy: internal error: KeyError: 'x' (rerun with --debug for details)\n")


def test_a_failed_step_stops_the_demo_with_a_non_zero_exit(monkeypatch, capsys):
    labs = []
    monkeypatch.setattr("rcopylab.labctl.Lab", lambda log=print: labs.append(FailingLab()) or labs[-1])
    monkeypatch.delenv("RCOPY_LAB_KEEP", raising=False)
    assert demo.main() == 1
    out = capsys.readouterr().out
    assert "FAILED  the demo ran to its end" in out and "bug in rcopy" in out
    assert "not by this demo" in out             # what the demo leaves to the lab tests is said
    assert labs[0].downs == 1
