"""The CLI funnel: version, help, usage errors as one line with exit code 2, no traceback."""
import subprocess
import sys

from rcopy import __version__
from rcopy.cli.main import main


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "rcopy", *argv], capture_output=True, text=True)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"rcopy {__version__}"


def test_help_lists_usage():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "usage: rcopy" in r.stdout


def test_unknown_command_is_one_line_exit_2():
    r = run_cli("no-such-noun")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rcopy: error:")
    assert "Traceback" not in r.stderr


def test_main_returns_code_instead_of_exiting(capsys):
    assert main(["--bogus-flag"]) == 2
    assert "rcopy: error:" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_keeps_the_errors_line_and_exit_code(tmp_path):
    plain = run_cli("--state-dir", str(tmp_path), "sync", "no-such-group")
    debug = run_cli("--state-dir", str(tmp_path), "--debug", "sync", "no-such-group")
    assert plain.returncode == debug.returncode not in (0, 1)
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    last = plain.stderr.strip().splitlines()[-1]
    assert last.startswith("rcopy: error:") and debug.stderr.strip().splitlines()[-1] == last


def test_version_imports_no_command_module():
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom rcopy.cli.main import main\ntry: main(['--version'])\n"
                        "except SystemExit: pass\nprint(sorted(m for m in sys.modules if m.startswith('rcopy.cli.')))"],
                       capture_output=True, text=True)
    assert r.stdout.strip().splitlines() == [f"rcopy {__version__}", "['rcopy.cli.main']"], r.stdout
