"""The control channel's one outstanding request (Peer.request): the primary sends ``begin`` and cuts
while the backup works; whatever it asks next (the answer, or an abort after a failed cut) reads the
begin's answer first, so replies never cross. Against a real subprocess speaking the wire format."""
import sys
import textwrap

import pytest

from rcopy.errors import Refused
from rcopy.model import Target
from rcopy.transport.peer import Peer

AGENT = textwrap.dedent("""
    import json, sys, time
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "begin":
            time.sleep(0.3)                          # the backup's R snapshots and exports
            if req["args"]["group"] == "refused":
                out = {"ok": False, "error": {"class": "Refused", "exit_code": 5, "message": "no"}}
            else:
                out = {"ok": True, "result": {"view": {}, "volumes": {}}}
        else:
            out = {"ok": True, "result": {"op": op}}
        out["id"] = req["id"]
        print(json.dumps(out), flush=True)
""")


@pytest.fixture
def peer(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    with Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}")) as p:
        yield p


def test_begin_answers_after_the_work_done_meanwhile(peer):
    answer = peer.begin_start("g", 2, "id", 1, "base", [], "127.0.0.1")
    assert peer.ping() == {"op": "ping"}          # reads the begin's answer first, then its own
    assert answer() == {"view": {}, "volumes": {}}


def test_an_abort_after_a_failed_cut_is_answered_even_when_the_begin_failed(peer):
    answer = peer.begin_start("refused", 2, "id", 1, "base", [], "127.0.0.1")
    assert peer.abort("refused", 2, "id", "cut failed") == {"op": "abort"}
    with pytest.raises(Refused, match="no"):
        answer()


def test_an_answer_the_closed_channel_never_gave_is_a_link_error(peer):
    answer = peer.begin_start("g", 2, "id", 1, "base", [], "127.0.0.1")
    peer.close()
    with pytest.raises(Exception, match="unreachable"):
        answer()
