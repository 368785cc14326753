"""The durable store: schema, modes, one transaction per sync-point commit, crash safety, group locks."""
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from rcopy.errors import AlreadyExists, Busy, NotFound, StateError
from rcopy.model import Group, GroupState, Target, VolumePair, VolumeState
from rcopy.state import SCHEMA_VERSION, Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"))
    s.add_target(Target("backup", ("169.254.70.2", "169.254.71.2"), None))
    s.add_group(Group("g", "backup", period=300, policies=frozenset({"auto_recover"})))
    s.add_volume(VolumePair("g", "a", "/dev/vg/a", "/dev/vg/a2", 4096))
    yield s
    s.close()


def test_modes_schema_and_wal(store):
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    for name in os.listdir(store.dir):
        p = os.path.join(store.dir, name)
        if os.path.isfile(p):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, name
    assert store.system().schema_version == SCHEMA_VERSION
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_round_trip_of_model_values(store):
    assert store.target("backup").links == ("169.254.70.2", "169.254.71.2")
    g = store.group("g")
    assert g.period == 300 and g.policies == frozenset({"auto_recover"}) and g.state is GroupState.NEW
    assert store.volume_by_local("/dev/vg/a").remote == "/dev/vg/a2"


def test_refusals_are_typed(store):
    with pytest.raises(AlreadyExists):
        store.add_group(Group("g", "backup"))
    with pytest.raises(AlreadyExists, match="already in group g"):
        store.add_volume(VolumePair("g", "b", "/dev/vg/a", "/x", 1))
    with pytest.raises(NotFound, match="no target nope"):
        store.target("nope")
    with pytest.raises(NotFound, match="no group nope"):
        store.group("nope")


def test_commit_is_one_transaction_and_idempotent(store):
    store.begin_sync("g", 1, "id1")
    assert store.volumes("g")[0].state is VolumeState.SYNCING
    g = store.commit_sync("g", 1, "id1", {"a": (123, "initial sync")})
    assert (g.generation, g.sync_id, g.pending_generation, g.state) == (1, "id1", 0, GroupState.STARTED)
    v = store.volumes("g")[0]
    assert (v.state, v.bytes_sent, v.full_reason) == (VolumeState.SYNCED, 123, "initial sync")
    assert store.commit_sync("g", 1, "id1").generation == 1          # a retried commit is a no-op
    with pytest.raises(StateError):
        store.commit_sync("g", 2, "other")                           # not in flight: refused
    assert [p.generation for p in store.sync_points("g")] == [1]


def test_failed_transaction_changes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.tx() as db:
            db.execute("UPDATE groups SET generation=99 WHERE name='g'")
            raise RuntimeError("boom")
    assert store.group("g").generation == 0


def test_abort_returns_volumes_to_the_last_point(store):
    store.begin_sync("g", 1, "id1")
    g = store.abort_sync("g", "link lost")
    assert g.state is GroupState.STOPPED and g.reason == "link lost" and not g.pending_generation
    assert store.volumes("g")[0].state is VolumeState.NOT_SYNCED
    assert store.sync_points("g") == []


_WRITER = textwrap.dedent("""
    import os, sys
    from rcopy.state import Store
    s = Store(sys.argv[1])
    s.begin_sync("g", 1, "id1")
    if sys.argv[2] == "before":
        s._db.execute("BEGIN IMMEDIATE")
        s._db.execute("UPDATE groups SET generation=1, sync_id='id1' WHERE name='g'")
        os._exit(9)                       # killed in the middle of the commit transaction
    s.commit_sync("g", 1, "id1")
    os._exit(9)                           # killed right after the commit
""")


@pytest.mark.parametrize("when", ["before", "after"])
def test_killed_writer_leaves_the_last_committed_state(store, when):
    store.close()
    r = subprocess.run([sys.executable, "-c", _WRITER, store.dir, when], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    s = Store(store.dir)
    g = s.group("g")
    if when == "before":
        assert (g.generation, g.pending_generation, g.pending_id) == (0, 1, "id1")
    else:
        assert (g.generation, g.sync_id, g.pending_generation) == (1, "id1", 0)
    s.close()


def test_newer_schema_is_refused(store):
    with store.tx() as db:
        db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StateError, match="newer than this rcopy"):
        Store(store.dir)


def test_an_upgrade_to_v8_leaves_each_secondary_one_tidy_up(tmp_path):
    """Older agents swept R snapshots at every start; v8 records the one to do: the upgrade asks once."""
    s = Store(str(tmp_path / "st"))
    for name, role, gen in (("p", "primary", 5), ("s", "secondary", 5), ("new", "secondary", 1)):
        s.add_group(Group(name, "t", role=role, generation=gen))
    s.close()
    with sqlite3.connect(os.path.join(str(tmp_path / "st"), "rcopy.db")) as db:
        db.execute("ALTER TABLE groups DROP COLUMN tidy")
        db.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    s = Store(str(tmp_path / "st"))
    assert {g.name: g.tidy for g in s.groups()} == {"p": 0, "s": 5, "new": 0}
    s.tidied("s", 4)                     # another point's tidy-up leaves this one to do
    assert s.group("s").tidy == 5
    s.tidied("s", 5)
    assert s.group("s").tidy == 0
    s.close()


_HOLDER = "import sys, time\nfrom rcopy.state import Store\nfd = Store(sys.argv[1]).try_lock('g')\nprint(fd is not None, flush=True)\ntime.sleep(60)\n"


def test_group_lock_is_exclusive_across_processes_and_dies_with_its_holder(store):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, store.dir], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "True"
        with pytest.raises(Busy, match="group g is busy"):
            with store.lock("g"):
                pass
    finally:
        p.kill()
        p.wait()
    with store.lock("g"):                     # the kernel dropped the dead holder's lock
        pass


def test_held_looks_at_proc_locks_without_taking_the_lock(store, monkeypatch):
    assert store.held("g") is False                        # no lock file yet
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, store.dir], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "True"
        assert store.held("g") is True
        holder = store.lock_holder("g")
        assert holder == p.pid
    finally:
        p.kill()
        p.wait()
    taken = []
    monkeypatch.setattr(store, "try_lock", lambda g: taken.append(g))
    assert store.held("g") is False                        # free, and found so without a try_lock
    assert taken == []
    assert store.lock_holder("g") == holder                # nobody overwrote the holder's pid


def test_flock_listed_reads_the_kernels_lines():
    from rcopy.state import flock_listed
    text = ("1: OFDLCK ADVISORY  READ -1 fe:00:77 201 201\n"
            "2: FLOCK  ADVISORY  WRITE 4242 fe:01:77 0 EOF\n"
            "3: -> FLOCK  ADVISORY  WRITE 4343 fe:02:88 0 EOF\n")
    assert flock_listed(text, 77, 0xfe, 1) is True
    assert flock_listed(text, 88, 0xfe, 2) is False         # a waiter holds nothing
    assert flock_listed(text, 77, 0xfe, 9) is None          # the inode only: the caller asks the lock itself
    assert flock_listed(text, 99, 0xfe, 1) is False
