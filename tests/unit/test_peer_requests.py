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


@pytest.mark.parametrize("ends_with, waits", [("commit", False), ("abort", False), (None, True)])
def test_close_waits_for_the_agent_only_when_its_eof_has_a_sync_to_roll_back(tmp_path, ends_with, waits):
    """The agent's exit (ssh, interpreter) costs ~0.5-0.9 s in the lab: a session whose sync was
    committed or aborted does not wait for it; one that leaves a begin open does (the rollback on EOF)."""
    import time
    done = tmp_path / "exited"
    script = tmp_path / "agent.py"
    script.write_text(AGENT + f"time.sleep(2.0)\nopen({str(done)!r}, 'w').close()\n")
    with Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}")) as p:
        p.begin_start("g", 2, "id", 1, "base", [], "127.0.0.1")()
        if ends_with == "commit":
            p.commit("g", 2, "id")
        elif ends_with == "abort":
            p.abort("g", 2, "id", "failed")
    assert done.exists() == waits
    for _ in range(200):                 # without waiting, the agent still finishes on its own
        if done.exists():
            break
        time.sleep(0.05)
    assert done.exists()


def test_hello_carries_the_target_timeout_and_a_ping_unanswered_for_the_link_timeout_is_a_link_error(tmp_path):
    """The heartbeat: an agent that stops answering (a silent link: ssh may not notice for a while)
    fails the ping after the target's link timeout, as a link error; hello told it the target timeout."""
    from rcopy.errors import LinkError
    script = tmp_path / "agent.py"
    seen = tmp_path / "hello.json"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "ping":
                sys.stdin.read()                     # silence, until the primary closes the channel
                sys.exit(0)
            if req["op"] == "hello":
                open({str(seen)!r}, "w").write(json.dumps(req["args"]))
            print(json.dumps({{"id": req["id"], "ok": True, "result": {{}}}}), flush=True)
    """))
    with Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}", link_timeout=1, target_timeout=42)) as p:
        with pytest.raises(LinkError, match="within 1 s"):
            p.ping()
        p.close(wait=False)
    import json
    assert json.loads(seen.read_text())["idle_timeout"] == 42


def test_a_started_peer_reads_hello_when_first_asked_and_falls_over_to_the_next_link(tmp_path):
    """Peer(wait=False): the sync spawns the agent and sends hello, does its own work, then reads the
    answer; a first link whose agent died is passed over then, as a waiting connect would."""
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    agent = f"sh -c 'test {{link}} = 127.0.0.2 && exec {sys.executable} {script}'"
    p = Peer(Target("b", ("127.0.0.1", "127.0.0.2"), agent), wait=False)
    try:
        assert p.link == "127.0.0.1" and not hasattr(p, "hello")     # started, not read
        assert p.ping() == {"op": "ping"}                              # ready() first, on its own
        assert p.link == "127.0.0.2" and p.hello == {"op": "hello"}
    finally:
        p.close()
    with Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}"), wait=False) as q:
        assert q.ready() is q and q.hello == {"op": "hello"} and q.ping() == {"op": "ping"}


def test_a_started_peer_closed_before_its_hello_is_read_does_not_wait_for_the_agent(tmp_path):
    """The local work that overlaps the agent's start failed: the agent has nothing to roll back, so
    closing does not wait for it (it exits on EOF when it gets there)."""
    script = tmp_path / "slow.py"
    script.write_text("import sys, time\ntime.sleep(60)\nsys.stdin.read()\n")
    p = Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}"), wait=False)
    proc = p.channel.proc
    try:
        p.close()
        assert proc.poll() is None and p.channel is None
    finally:
        proc.kill()
        proc.wait()


def test_digests_given_up_on_are_a_link_error_and_their_late_answer_is_skipped(tmp_path, monkeypatch):
    """A backup slow to hash (a stuck disk) fails the digests after their timeout, a link error the
    refine falls back on; the answer that comes later is not taken for the next request's."""
    from rcopy.errors import LinkError
    from rcopy.transport import peer as peer_mod
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent("""
        import base64, json, sys, time
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "digests":
                time.sleep(1.5)
                result = {"digests": base64.b64encode(b"d" * 16).decode()}
            else:
                result = {"op": req["op"]}
            print(json.dumps({"id": req["id"], "ok": True, "result": result}), flush=True)
    """))
    monkeypatch.setattr(peer_mod, "DIGESTS_TIMEOUT", 0.5)
    with Peer(Target("b", ("127.0.0.1",), f"{sys.executable} {script}", link_timeout=0.5)) as p:
        with pytest.raises(LinkError, match="within 0.5 s"):
            p.digests("g", "s", "/dev/x", [(0, 4096)])()
        assert p.call("ping", timeout=10) == {"op": "ping"}          # the late digests answer skipped
        monkeypatch.setattr(peer_mod, "DIGESTS_TIMEOUT", 30)
        assert p.digests("g", "s", "/dev/x", [(0, 4096)])() == b"d" * 16
