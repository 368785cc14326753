"""The agent as a process: the JSON-lines protocol, typed errors across the wire, and the rollback it
does by itself when its stdin closes mid-sync or when it starts after a crash (design §2.5)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from rcopy.engine.cycle import PeerView
from rcopy.model import Group, Role, VolumePair, VolumeState
from rcopy.state import Store

SIZE = 1 << 20
needs_nbdkit = pytest.mark.skipif(not shutil.which("nbdkit"), reason="nbdkit not installed (scripts/setup)")


class AgentProc:
    def __init__(self, state, env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "rcopy", "--state-dir", state, "agent"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "RCOPY_ALLOW_NONROOT": "1", **(env or {})})
        self.n = 0

    def raw(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def call(self, op, **args):
        self.n += 1
        reply = self.raw(json.dumps({"id": self.n, "op": op, "args": args}))
        assert reply["id"] == self.n
        return reply

    def close(self):
        self.p.stdin.close()
        assert self.p.wait(timeout=60) == 0
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture
def backup(tmp_path):
    """A backup whose group g is at sync point 1 (id 'one') with one synced file secondary."""
    sec = tmp_path / "sec.img"
    sec.write_bytes(os.urandom(SIZE))
    s = Store(str(tmp_path / "B"))
    s.add_group(Group("g", "primary", role=Role.SECONDARY, generation=1, sync_id="one"))
    s.add_volume(VolumePair("g", "sec-img", str(sec), "/dev/vg/a", SIZE, state=VolumeState.SYNCED, last_sync=1.0,
                            backend="file"))
    s.close()
    return tmp_path, str(sec)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_protocol_hello_errors_and_garbage(backup):
    tmp, _ = backup
    a = AgentProc(str(tmp / "B"))
    hello = a.call("hello", protocol=1, peer="p")
    assert hello["ok"] and hello["result"]["protocol"] == 1
    bad = a.call("hello", protocol=99)
    assert not bad["ok"] and bad["error"]["class"] == "Refused" and bad["error"]["exit_code"] == 5
    unknown = a.call("frobnicate")
    assert unknown["error"]["class"] == "Refused"
    missing = a.call("status", group="nope")
    assert missing["ok"] and missing["result"] == {"exists": False}
    wrong_args = a.call("status", nonsense=1)
    assert wrong_args["error"]["class"] == "UsageError"
    garbage = a.raw("{not json")
    assert garbage["ok"] is False and garbage["error"]["exit_code"] == 2
    for hostile in ("[1, 2]", '"a string"', "42", "null", '{"op": 5}', '{"op": "status", "args": [1]}',
                    '{"id": 7, "op": "status", "args": {"group": ["x"]}}', '{"op": "begin", "args": {"group": 1}}'):
        reply = a.raw(hostile)
        assert reply["ok"] is False and reply["error"]["class"] in ("UsageError", "Refused", "NotFound"), hostile
    long = a.raw("x" * (3 << 20))                 # past the 1 MiB line limit: skipped, answered, still serving
    assert long["ok"] is False and "longer than" in long["error"]["message"]
    import random
    rnd = random.Random(7)
    for _ in range(50):
        junk = bytes(rnd.randrange(32, 127) for _ in range(rnd.randrange(1, 300))).decode()
        assert a.raw(junk)["ok"] is False
    st = a.call("status", group="g")["result"]
    assert (st["generation"], st["sync_id"], st["pending_generation"]) == (1, "one", 0)
    a.close()


def test_group_create_is_idempotent_and_refuses_a_clash(backup):
    tmp, _ = backup
    a = AgentProc(str(tmp / "B"))
    assert a.call("group_create", group="h", source="p")["result"] == {"created": True}
    assert a.call("group_create", group="h", source="p")["result"] == {"created": False}
    clash = a.call("group_create", group="h", source="other")
    assert clash["error"]["class"] == "Refused"
    assert a.call("group_create", group="bad.name", source="p")["error"]["exit_code"] == 2
    a.close()


def _begin(a, sec, base_id="one"):
    r = a.call("begin", group="g", generation=2, sync_id="two", base_generation=1, base_id=base_id,
               remotes=[sec], bind="127.0.0.1")
    assert r["ok"], r
    vol = r["result"]["volumes"][sec]
    vol["base"] = PeerView.from_dict(r["result"]["view"]).holds(1, base_id, sec)
    return vol


@needs_nbdkit
def test_begin_proves_the_base_and_eof_rolls_back(backup):
    tmp, sec = backup
    before = sha(sec)
    a = AgentProc(str(tmp / "B"))
    vol = _begin(a, sec)
    assert vol["base"] is True and vol["export"]["port"] > 0 and vol["export"]["size"] == SIZE
    assert os.path.exists(tmp / "rcopy.g.sec-img.R1")
    busy = a.call("begin", group="g", generation=2, sync_id="x", base_generation=1, base_id="one",
                  remotes=[sec], bind="127.0.0.1")
    assert busy["error"]["class"] == "Busy" and busy["error"]["exit_code"] == 8
    with open(sec, "r+b") as f:                 # half a sync landed
        f.write(b"\xff" * 8192)
    a.close()                                   # the primary went away: stdin closed
    assert sha(sec) == before and not os.path.exists(tmp / "rcopy.g.sec-img.R1")
    g = Store(str(tmp / "B")).group("g")
    assert (g.generation, g.pending_generation, g.state.value) == (1, 0, "stopped") and "went away" in g.reason


@needs_nbdkit
def test_a_wrong_base_is_refused_per_volume(backup):
    tmp, sec = backup
    a = AgentProc(str(tmp / "B"))
    assert _begin(a, sec, base_id="not-one")["base"] is False
    a.call("abort", group="g", generation=2, sync_id="two", reason="test")
    a.close()


@needs_nbdkit
def test_commit_is_durable_and_drops_the_rollback_snapshot(backup):
    tmp, sec = backup
    a = AgentProc(str(tmp / "B"))
    _begin(a, sec)
    assert a.call("commit", group="g", generation=2, sync_id="two")["result"]["committed"] == 2
    assert a.call("commit", group="g", generation=2, sync_id="two")["ok"]          # a retry is fine
    assert not os.path.exists(tmp / "rcopy.g.sec-img.R1")
    a.close()
    g = Store(str(tmp / "B")).group("g")
    assert (g.generation, g.sync_id) == (2, "two")


@needs_nbdkit
def test_a_killed_agent_is_rolled_back_by_the_next_one(backup):
    tmp, sec = backup
    before = sha(sec)
    a = AgentProc(str(tmp / "B"))
    _begin(a, sec)
    with open(sec, "r+b") as f:
        f.write(b"\xff" * 8192)
    a.p.send_signal(signal.SIGKILL)
    a.p.wait()
    b = AgentProc(str(tmp / "B"))
    st = b.call("status", group="g")["result"]          # recover ran before the first request
    assert (st["generation"], st["pending_generation"]) == (1, 0) and "died" in st["reason"]
    assert sha(sec) == before
    b.close()


@needs_nbdkit
def test_silence_mid_sync_rolls_back_and_exits(backup):
    tmp, sec = backup
    before = sha(sec)
    a = AgentProc(str(tmp / "B"), env={"RCOPY_AGENT_TIMEOUT": "1"})
    _begin(a, sec)
    with open(sec, "r+b") as f:
        f.write(b"\xff" * 4096)
    assert a.p.wait(timeout=60) == 0                     # gave up on its own, stdin still open
    assert sha(sec) == before
    assert Store(str(tmp / "B")).group("g").pending_generation == 0


@needs_nbdkit
def test_a_new_primary_connection_takes_over_from_a_stale_agent(backup):
    tmp, sec = backup
    before = sha(sec)
    stale = AgentProc(str(tmp / "B"))                     # its ssh session outlived a cut link
    _begin(stale, sec)
    with open(sec, "r+b") as f:
        f.write(b"\xff" * 4096)
    fresh = AgentProc(str(tmp / "B"))
    st = fresh.call("status", group="g")["result"]
    assert st["pending_generation"] == 0 and st["generation"] == 1
    assert stale.p.wait(timeout=60) == 0 and sha(sec) == before
    _begin(fresh, sec)                                    # and the next sync can begin
    fresh.call("abort", group="g", generation=2, sync_id="two", reason="test")
    fresh.close()


@needs_nbdkit
def test_a_channel_moved_to_another_link_reaches_the_agent_serving_the_sync(backup):
    """The control channel's link went silent mid-sync: a second agent (reached over another link)
    attaches to the one serving the sync and relays; that one keeps its export and commits. Its old
    stdin is no longer read: closing it rolls nothing back."""
    tmp, sec = backup
    served = AgentProc(str(tmp / "B"))
    export = _begin(served, sec)["export"]
    moved = AgentProc(str(tmp / "B"))
    wrong = moved.call("attach", group="g", sync_id="not-two")
    assert wrong["error"]["class"] == "StateError" and "not in flight" in wrong["error"]["message"]
    assert moved.call("attach", group="g", sync_id="two")["result"] == {"attached": 2}
    served.p.stdin.close()                        # the dead link's channel: its EOF is not a hang-up now
    assert moved.call("ping")["ok"]
    assert served.p.poll() is None
    from rcopy.transport.client import NbdClient  # the export the sync began is still up, and written
    with NbdClient(export["host"], export["port"], export["name"]) as c:
        c.write(0, b"\x5a" * 4096)
        c.flush()
    assert moved.call("commit", group="g", generation=2, sync_id="two")["result"]["committed"] == 2
    moved.close()                                 # the relay ends, and with it the serving agent
    assert served.p.wait(timeout=60) == 0
    g = Store(str(tmp / "B")).group("g")
    assert (g.generation, g.sync_id, g.pending_generation) == (2, "two", 0)
    assert open(sec, "rb").read(4096) == b"\x5a" * 4096


@needs_nbdkit
def test_the_primarys_channel_reattaches_over_its_other_link(backup):
    """rcopy.transport.peer.Peer.reattach: a second agent over the other link, attached to the one
    serving the sync; the sync is committed through it; a reattach with no sync to attach to fails."""
    from rcopy.errors import StateError
    from rcopy.model import Target
    from rcopy.transport.peer import Peer, TargetUnreachable
    tmp, sec = backup
    agent = f"env RCOPY_ALLOW_NONROOT=1 LINK={{link}} {sys.executable} -m rcopy --state-dir {tmp / 'B'} agent"
    peer = Peer(Target("backup", ("127.0.0.1", "127.0.0.2"), agent))
    first = peer.channel.proc
    begun = peer.begin_start("g", 2, "two", 1, "one", [sec], peer.link)()
    assert peer.reattach("g", "two", "no answer within 25 s") == "127.0.0.2"
    assert peer.lost_links == {"127.0.0.1": "no answer within 25 s"}
    assert peer.ping() and first.poll() is None
    # a begin whose answer the lost link took: asked again, the serving agent gives the same exports
    assert peer.begin_start("g", 2, "two", 1, "one", [sec], "127.0.0.1")() == begun
    assert peer.commit("g", 2, "two")["committed"] == 2
    peer.close()
    assert first.wait(timeout=60) == 0
    assert Store(str(tmp / "B")).group("g").generation == 2
    with Peer(Target("backup", ("127.0.0.1", "127.0.0.2"), agent)) as late:
        with pytest.raises(StateError, match="not in flight"):
            late.reattach("g", "two", "test")
        assert late.channel is None
    with Peer(Target("backup", ("127.0.0.1", "127.0.0.2"), agent)) as late:
        # a commit whose answer the lost link took: the new channel asks again and learns it was made
        assert late.reattach("g", "two", "test", settled=True) == "127.0.0.2"
        assert late.commit("g", 2, "two")["committed"] == 2
    with Peer(Target("backup", ("127.0.0.1",), agent)) as alone:
        with pytest.raises(TargetUnreachable, match="only link"):
            alone.reattach("g", "two", "test")


@needs_nbdkit
def test_a_relay_that_closes_mid_sync_rolls_the_sync_back(backup):
    tmp, sec = backup
    before = sha(sec)
    served = AgentProc(str(tmp / "B"))
    _begin(served, sec)
    moved = AgentProc(str(tmp / "B"))
    assert moved.call("attach", group="g", sync_id="two")["ok"]
    with open(sec, "r+b") as f:
        f.write(b"\xff" * 4096)
    moved.close()                                 # the new channel went away too: a hang-up
    assert served.p.wait(timeout=60) == 0 and sha(sec) == before
    assert Store(str(tmp / "B")).group("g").pending_generation == 0
    late = AgentProc(str(tmp / "B"))              # nothing left to attach to
    gone = late.call("attach", group="g", sync_id="two")
    assert gone["error"]["class"] == "StateError"
    late.close()


@needs_nbdkit
def test_the_export_admits_only_the_primarys_address(tmp_path, monkeypatch):
    """Issue 13, the second fence: the agent, reached by ssh, starts nbdkit with rcopy's peer filter
    admitting only SSH_CONNECTION's client address. A connection from another address (127.0.0.2: all of
    127/8 is loopback) is closed before the NBD greeting; one from the primary's address gets it, and a
    full NBD client from there works."""
    import socket
    from rcopy.app.agent import _default_exporter
    from rcopy.sys import nbdkit
    from rcopy.transport.client import NbdClient
    assert nbdkit.peer_filter() == nbdkit.PEER_FILTER, "rcopy's nbdkit filter is not built (setup.py build_ext)"
    (tmp_path / "vol").write_bytes(bytes(SIZE))
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 40222 127.0.0.1 22")
    ex = _default_exporter({"vol": str(tmp_path / "vol")}, "127.0.0.1")
    try:
        info = ex.infos["vol"]

        def greeting(source):
            with socket.socket() as s:
                s.settimeout(10)
                s.bind((source, 0))
                s.connect((info.host, info.port))
                return s.recv(8, socket.MSG_WAITALL)

        assert greeting("127.0.0.2") == b""                     # closed before a single byte of NBD
        assert greeting("127.0.0.1") == b"NBDMAGIC"
        with NbdClient(info.host, info.port, info.name, timeout=10) as c:
            c.pwrite(b"p" * 4096, 0)
            c.flush()
        assert (tmp_path / "vol").read_bytes()[:4096] == b"p" * 4096
        assert any(a.endswith("nbdkit-rcopy-peer.so") for a in ex.server.proc.args)
    finally:
        ex.stop()


@needs_nbdkit
def test_the_export_listens_on_every_link_of_this_host_and_admits_the_primarys_links(tmp_path, monkeypatch):
    """Several links: the agent serves the same export on each link address the primary named that is
    an address here (one not held here, or not resolving, is left out), and its fence admits the
    primary's address on the control link plus the primary's other links from this system's target
    record, nobody else."""
    import socket
    from rcopy.app.agent import _default_exporter
    from rcopy.transport.client import NbdClient
    (tmp_path / "vol").write_bytes(bytes(SIZE))
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 40222 127.0.0.1 22")
    ex = _default_exporter({"vol": str(tmp_path / "vol")}, "127.0.0.1",
                           links=("127.0.0.1", "127.0.0.2", "192.0.2.7", "no-such-host.invalid"),
                           peers=("127.0.0.3",))
    try:
        info = ex.infos["vol"]
        assert [h for h, _ in info.addresses] == ["127.0.0.1", "127.0.0.2"]

        def greeting(source, host, port):
            with socket.socket() as s:
                s.settimeout(10)
                s.bind((source, 0))
                s.connect((host, port))
                return s.recv(8, socket.MSG_WAITALL)

        for host, port in info.addresses:
            assert greeting("127.0.0.4", host, port) == b""          # not a link of the primary
            assert greeting("127.0.0.3", host, port) == b"NBDMAGIC"  # the primary's other link
            assert greeting("127.0.0.1", host, port) == b"NBDMAGIC"
        for i, (host, port) in enumerate(info.addresses):
            with NbdClient(host, port, info.name, timeout=10) as c:
                c.pwrite(bytes([65 + i]) * 4096, i * 4096)
                c.flush()
        assert (tmp_path / "vol").read_bytes()[:8192] == b"A" * 4096 + b"B" * 4096
    finally:
        ex.stop()
    assert ex.servers == []


@needs_nbdkit
def test_the_peer_filter_fails_closed(tmp_path):
    """Without a valid allow= address nbdkit does not start at all: never an export open to everyone."""
    from rcopy.sys import nbdkit
    for args in ((), ("allow=primary",)):
        r = subprocess.run(["nbdkit", f"--filter={nbdkit.PEER_FILTER}", "memory", "1M", *args], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0 and "rcopy-peer" in r.stderr, r.stderr


def test_without_ssh_the_agent_knows_no_primary_address(monkeypatch):
    from rcopy.app.agent import primary_address
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    assert primary_address() is None
    monkeypatch.setenv("SSH_CONNECTION", "fe80::1%eth1 40222 fe80::2%eth1 22")
    assert primary_address() == "fe80::1"


def test_the_peer_filter_is_probed_once_per_boot_and_again_after_an_upgrade(tmp_path, monkeypatch):
    """Each sync's agent is a new process: the probe's answer lives in /run (PROBE_DIR), keyed by the
    nbdkit binary and the filter, so a sync costs no probe but a changed file is probed again."""
    from rcopy.sys import nbdkit, run as runner
    if not os.path.exists(nbdkit.PEER_FILTER):
        pytest.fail("rcopy's nbdkit filter is not built (setup.py build_ext)")
    monkeypatch.setattr(nbdkit, "PROBE_DIR", str(tmp_path / "run"))
    filt = tmp_path / "filter.so"
    filt.write_bytes(open(nbdkit.PEER_FILTER, "rb").read())
    monkeypatch.setattr(nbdkit, "PEER_FILTER", str(filt))
    probes = []

    def counted():
        nbdkit._own_filter.cache_clear()
        with runner.ledger() as book:
            assert nbdkit.peer_filter() == str(filt)
        probes.append(book.commands)
    counted()
    counted()
    os.utime(filt, ns=(1, 1))
    counted()
    assert probes == [1, 0, 1]


@needs_nbdkit
def test_the_primarys_target_timeout_from_hello_rolls_back_a_silent_sync(backup, monkeypatch):
    tmp, sec = backup
    before = sha(sec)
    monkeypatch.delenv("RCOPY_AGENT_TIMEOUT", raising=False)
    a = AgentProc(str(tmp / "B"))
    assert a.call("hello", protocol=1, peer="primary", idle_timeout=10)["ok"]
    _begin(a, sec)
    with open(sec, "r+b") as f:
        f.write(b"\xff" * 4096)
    assert a.p.wait(timeout=120) == 0                    # the target's 10 s, not the default 200 s
    assert sha(sec) == before and "no request for 10 s" in a.p.stderr.read()


def test_rcopy_agent_timeout_on_the_backup_wins_over_hello(tmp_path, monkeypatch):
    from rcopy.app import agent as agent_mod
    store = Store(str(tmp_path / "B"))
    a = agent_mod.Agent(store)
    a.op_hello(1, "primary", idle_timeout=30)
    assert a.idle_timeout == 30
    monkeypatch.setenv("RCOPY_AGENT_TIMEOUT", "7")
    b = agent_mod.Agent(store)
    b.op_hello(1, "primary", idle_timeout=30)
    assert b.idle_timeout == 7                          # what the agent read from the environment at start


@needs_nbdkit
def test_the_backup_answers_digests_of_the_sync_in_flight_only(backup, tmp_path):
    """``digests`` through rcopy.transport.peer: the blocks the secondary holds, only for a secondary of
    the sync in flight, spans checked; a heartbeat thread pinging meanwhile gets its own answer, and
    the refine built on it gives the local refine's extents."""
    import threading

    from rcopy.changes import digest
    from rcopy.changes.scan import scan
    from rcopy.errors import NotFound, StateError, UsageError
    from rcopy.extent import Extent
    from rcopy.model import Target
    from rcopy.transport.peer import Peer
    tmp, sec = backup
    agent = f"env RCOPY_ALLOW_NONROOT=1 {sys.executable} -m rcopy --state-dir {tmp / 'B'} agent"
    with Peer(Target("backup", ("127.0.0.1",), agent)) as peer:
        with pytest.raises(StateError, match="no sync two in flight"):
            peer.digests("g", "two", sec, [(0, 8192)])()
        peer.begin_start("g", 2, "two", 1, "one", [sec], peer.link)()
        spans = [(0, 8192), (65536, 3 * 65536)]
        assert peer.digests("g", "two", sec, spans)() == digest.digests_of(sec, [list(s) for s in spans])
        with pytest.raises(NotFound, match="not a secondary of the sync"):
            peer.digests("g", "two", str(tmp / "other.img"), spans)()
        with pytest.raises(StateError, match="no sync other"):
            peer.digests("g", "other", sec, spans)()
        with pytest.raises(UsageError, match="unaligned"):
            peer.digests("g", "two", sec, [(0, 100)])()
        # the heartbeat's ping reads the digests' answer on the way and keeps it for their asker
        answer = peer.digests("g", "two", sec, [(0, SIZE)])
        pings = []
        t = threading.Thread(target=lambda: pings.append(peer.ping()))
        t.start()
        t.join()
        assert pings and "time" in pings[0]
        assert answer() == digest.digests_of(sec, [[0, SIZE]])
        # the refine against the backup: old = what it holds, new = that with a few blocks changed
        new = tmp_path / "new.img"
        data = bytearray(open(sec, "rb").read())
        data[4096:8192] = os.urandom(4096)
        data[70000:70010] = b"\0" * 10
        new.write_bytes(data)
        cands = [Extent(0, 65536), Extent(65536, 65536)]
        got = list(digest.refine_remote(sec, str(new), cands, lambda s: peer.digests("g", "two", sec, s)))
        assert got == list(scan(sec, str(new), ranges=cands)) == [Extent(4096, 4096), Extent(69632, 4096)]
        peer.abort("g", 2, "two", "test")


def test_a_begin_that_fails_after_opening_the_secondaries_makes_them_read_only_again(backup, monkeypatch):
    """The export failing to start (nbdkit missing, a port clash) must not leave the secondaries
    writable until some later sync's tidy-up: the begin closes what it opened."""
    from rcopy import backends
    from rcopy.app import agent as agent_mod
    from rcopy.errors import ToolError
    tmp, sec = backup
    seen = []
    monkeypatch.setattr(backends, "open_for_sync", lambda pairs, known=None: seen.append(("open", pairs)) or
                        {sec: "as opened"})
    monkeypatch.setattr(backends, "protect", lambda pairs, writable, known=None, **kw:
                        seen.append(("protect", pairs, writable, known)) or {})

    def no_export(*a, **k):
        raise ToolError("nbdkit did not start")
    store = Store(str(tmp / "B"))
    a = agent_mod.Agent(store, exporter=no_export)
    with pytest.raises(ToolError):
        a.op_begin("g", 2, "two", 1, "one", [sec], "127.0.0.1")
    assert seen == [("open", [("file", sec)]), ("protect", [("file", sec)], False, {sec: "as opened"})]
    g = store.group("g")
    assert (g.generation, g.pending_generation) == (1, 0)
