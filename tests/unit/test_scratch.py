"""rcopy.sys.scratch: a killed process's throw-away keys do not outlive the next rcopy on the host."""
import os
import stat
import subprocess

from rcopy.sys import scratch


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_sweep_removes_what_dead_owners_left_and_nothing_else(tmp_path):
    dead, alive = tmp_path / f"rcopy-client-{dead_pid()}-x1", tmp_path / f"rcopy-export-{os.getpid()}-x2"
    foreign, unowned = tmp_path / "rcopy-client-x3", tmp_path / f"other-{dead_pid()}-x4"
    for d in (dead, alive, foreign, unowned):
        d.mkdir()
        (d / "key.pem").write_text("secret")
    assert scratch.sweep(str(tmp_path)) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, foreign, unowned))


def test_a_scratch_directory_is_private_named_after_its_owner_and_gone_on_leaving():
    with scratch.directory("client") as d:
        assert os.path.basename(d).startswith(f"rcopy-client-{os.getpid()}-")
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        open(os.path.join(d, "client-key.pem"), "w").close()
    assert not os.path.exists(d)
