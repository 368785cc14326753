"""The long-lived lvm shell: the real ``lvm`` of this host (no device-mapper needed for reports and
their failures), and a scripted stand-in for what the host's lvm cannot show (a hang, a question)."""
import os
import stat

import pytest

from rcopy.sys import lvm, lvm_shell
from rcopy.sys.run import CommandTimeout, ledger


@pytest.fixture
def fresh(monkeypatch):
    """A process state with no shell yet, and none left behind."""
    monkeypatch.delenv("RCOPY_LVM_SHELL", raising=False)
    monkeypatch.setattr(lvm_shell, "_shell", None)
    monkeypatch.setattr(lvm_shell, "_off_why", "")
    yield
    lvm_shell.stop()


def test_words_are_quoted_only_when_needed_and_what_the_shell_cannot_carry_goes_to_a_process():
    assert lvm_shell.line(("lvs", "-o", "lv_name,lv_size", "vg-a/lv.b")) == "lvs -o lv_name,lv_size vg-a/lv.b"
    assert lvm_shell.line(("lvs", "--config", "devices { scan_lvs = 0 }")) == "lvs --config 'devices { scan_lvs = 0 }'"
    assert lvm_shell.line(("lvs", "it's")) is None
    assert lvm_shell.line(("lvs", 'say "x"')) is None
    assert lvm_shell.line(("lvs", "a\nb")) is None
    assert lvm_shell.line(("lvremove",) + tuple(f"vg/lv{i}" for i in range(70))) is None


def test_status_row_gives_the_exit_code_and_lastlog_the_errors():
    ok = {"log": [{"log_type": "status", "log_context": "shell", "log_ret_code": "1"}]}
    bad = {"log": [{"log_type": "error", "log_context": "processing", "log_message": "Volume group \"x\" not found"},
                   {"log_type": "status", "log_context": "processing", "log_ret_code": "5"},
                   {"log_type": "status", "log_context": "shell", "log_ret_code": "5"}]}
    assert lvm_shell.status(ok) == 0 and lvm_shell.status(bad) == 5 and lvm_shell.status({}) == 5
    assert lvm_shell.errors(bad) == 'Volume group "x" not found'


def test_real_lvm_answers_reports_and_failures_through_one_shell(fresh):
    with ledger() as book:
        assert lvm.lvs("rcopy-no-such-vg") == []             # a failed report: "not found" is read from lastlog
        assert lvm.vg("rcopy-no-such-vg") is None
        res = lvm._lvm("lvs", "--reportformat", "json", "-o", "lv_name", "rcopy-no-such-vg", check=False)
    assert res.rc == 5 and 'Volume group "rcopy-no-such-vg" not found' in res.stderr
    shell = lvm_shell._shell
    assert shell is not None and shell.alive
    assert book.commands == 3 and book.by_tool["lvs"] == 2 and book.by_tool["vgs"] == 1
    assert book.processes == 0                            # all three in the shell
    with pytest.raises(lvm.LvmError, match="rcopy-no-such-vg"):
        lvm._lvm("vgs", "rcopy-no-such-vg")
    assert lvm_shell._shell is shell                      # the same process answered all of them


def test_a_forked_child_starts_its_own_shell_and_leaves_the_parents_alone(fresh):
    lvm.lvs("rcopy-no-such-vg")
    parent = lvm_shell._shell
    pid = os.fork()
    if pid == 0:
        try:
            lvm.lvs("rcopy-no-such-vg")
            os._exit(0 if lvm_shell._shell is not parent and lvm_shell._shell.proc.pid != parent.proc.pid else 1)
        except BaseException:
            os._exit(2)
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0
    assert parent.alive and lvm.lvs("rcopy-no-such-vg") == [] and lvm_shell._shell is parent


def test_switched_off_every_command_is_a_process(fresh, monkeypatch):
    monkeypatch.setenv("RCOPY_LVM_SHELL", "0")
    with ledger() as book:
        assert lvm.lvs("rcopy-no-such-vg") == [] and lvm_shell._shell is None
    assert book.commands == book.processes == 1


FAKE_LVM = """#!/bin/bash
# A stand-in for lvm's shell: prompt, read a line, act on its first word.
printf 'lvm> '
while IFS= read -r line; do
  case "$line" in
    hang*) sleep 600 ;;
    ask*) printf 'Do you really want to remove it? [y/n]: '; IFS= read -r answer
          code=1; [ "$answer" = y ] && code=1 || code=5
          echo "{\\"log\\": [{\\"log_type\\": \\"status\\", \\"log_context\\": \\"shell\\", \\"log_ret_code\\": \\"$code\\"}]}" >&$LVM_REPORT_FD ;;
    lastlog*) echo '{"log": [{"log_type": "error", "log_message": "refused by the answer"}]}' >&$LVM_REPORT_FD ;;
    *) echo '{"report": [{"lv": []}], "log": [{"log_type": "status", "log_context": "shell", "log_ret_code": "1"}]}' >&$LVM_REPORT_FD ;;
  esac
  printf 'lvm> '
done
"""


@pytest.fixture
def fake_lvm(fresh, tmp_path, monkeypatch):
    bin_dir, prof = tmp_path / "bin", tmp_path / "profile"
    bin_dir.mkdir()
    prof.mkdir()
    (prof / "lvmdbusd.profile").write_text("")
    exe = bin_dir / "lvm"
    exe.write_text(FAKE_LVM)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(lvm_shell, "PROFILE_DIR", str(prof))


def test_a_command_past_its_timeout_kills_the_shell_and_the_next_starts_another(fake_lvm):
    shell = lvm_shell.get()
    with pytest.raises(CommandTimeout):
        lvm._lvm("hang", timeout=1)
    assert not shell.alive
    assert lvm._lvm("lvs").ok and lvm_shell._shell is not shell and lvm_shell._shell.alive


def test_a_question_is_answered_no(fake_lvm):
    res = lvm._lvm("ask", check=False)
    assert res.rc == 5 and "refused by the answer" in res.stderr


def test_without_lvm2s_profile_commands_run_as_processes(fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(lvm_shell, "PROFILE_DIR", str(tmp_path))
    assert lvm_shell.get() is None and "profile" in lvm_shell._off_why
    assert lvm.lvs("rcopy-no-such-vg") == []
