"""One long-lived ``lvm`` shell per process: LVM commands without a process start and a config load each.

Why: every ``lvm`` process pays its start, config parse and locking set-up; in the TCG lab that is
0.3-1 s per command and a sync ran ~18 of them. Inside one shell the same command costs what the
work costs (measured: 4 ``lvs`` 1.9 s as processes, 0.6 s through one shell).

How (lvm2's lvmdbusd drives LVM the same way; read, not copied): ``lvm`` with no arguments reads
commands from a terminal, so it runs on a pty and the ``lvm> `` prompt marks the end of each
command. ``LVM_REPORT_FD`` sends every report, and with the command profile ``lvmdbusd`` that lvm2
ships (``log/report_command_log=1``, JSON) each command's status, to a pipe of its own; a failed
command's messages are read back with ``lastlog``. The shell splits its line on blanks and honours
quotes; arguments that would need more (a quote, a newline, over 60 words) go to a process instead.

A shell is never shared across a fork (the child starts its own) and a command that outlives its
timeout kills the shell, as a process would have been killed; the next command starts a new one.
``RCOPY_LVM_SHELL=0`` turns it off (every command a process, as before).
"""
from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import threading
import time

from rcopy.errors import ToolError
from rcopy.sys.run import CommandTimeout, Result, _env, _record

log = logging.getLogger("rcopy.lvm")

PROFILE = "lvmdbusd"                # lvm2's own command profile for programs driving its shell
PROFILE_DIR = "/etc/lvm/profile"
PROMPT = b"lvm> "
QUESTION = re.compile(rb"\[y/n\]: *$")
MAX_WORDS = 60                      # lvm's shell splits a line into at most 64 words
MAX_LINE = 3000                     # well under a terminal's 4 KiB line
START_TIMEOUT = 30.0
_PLAIN = re.compile(r"^[A-Za-z0-9+_.:/=,@%-]+$")


class ShellUnavailable(ToolError):
    """the lvm shell could not start: {why}"""


class _Late(Exception):
    """The shell did not show its prompt before the deadline."""


def quote(arg: str) -> str | None:
    """The word as the lvm shell reads it back; None when it cannot carry it (a quote or newline)."""
    if _PLAIN.match(arg):
        return arg
    if any(c in arg for c in "'\"\\\n\r"):
        return None
    return f"'{arg}'"


def line(argv: tuple[str, ...]) -> str | None:
    """One shell line for argv (the command and its arguments), or None if it must run as a process."""
    if len(argv) > MAX_WORDS:
        return None
    words = [quote(a) for a in argv]
    if any(w is None for w in words) or sum(len(w) + 1 for w in words) > MAX_LINE:
        return None
    return " ".join(words)


def status(doc: dict) -> int:
    """The exit code a process would have had, from the shell's status row (log_context 'shell')."""
    rows = [r for r in doc.get("log", []) if r.get("log_type") == "status" and r.get("log_context") == "shell"]
    if not rows:
        return 5
    ret = int(str(rows[-1].get("log_ret_code", "5")) or 5)
    return 0 if ret == 1 else ret       # ECMD_PROCESSED (1) is lvm's exit 0


def errors(doc: dict) -> str:
    """The error and warning messages of ``lastlog``'s report, one per line (what stderr would hold)."""
    return "\n".join(str(r.get("log_message", "")) for r in doc.get("log", [])
                     if r.get("log_type") in ("error", "warn"))


def parse(raw: bytes) -> dict:
    """The one JSON document a command wrote to the report pipe ({} when it wrote none)."""
    text = raw.decode(errors="replace").strip()
    return json.loads(text) if text else {}


class Shell:
    """A running ``lvm`` shell; :meth:`run` is serialised (one command at a time, like a terminal)."""

    def __init__(self):
        if not os.path.exists(os.path.join(PROFILE_DIR, PROFILE + ".profile")):
            raise ShellUnavailable(why=f"{PROFILE_DIR}/{PROFILE}.profile (shipped with lvm2) is missing")
        master, slave = pty.openpty()
        rfd, wfd = os.pipe()
        env = _env()
        env.update(LVM_REPORT_FD=str(wfd), LVM_COMMAND_PROFILE=PROFILE, LVM_SUPPRESS_FD_WARNINGS="1",
                   TERM="dumb")             # no escape sequences around the prompt
        try:
            self.proc = subprocess.Popen(["lvm"], stdin=slave, stdout=slave, stderr=slave, pass_fds=(wfd,),
                                         env=env, start_new_session=True)
        except FileNotFoundError:
            os.close(master)
            os.close(rfd)
            raise ShellUnavailable(why="lvm is not installed") from None
        finally:
            os.close(slave)
            os.close(wfd)
        self.master, self.report, self.pid = master, rfd, os.getpid()
        self.mutex = threading.Lock()
        try:
            out, _ = self._exchange(None, time.monotonic() + START_TIMEOUT)
        except (_Late, OSError) as e:
            self.close()
            raise ShellUnavailable(why=str(e) or f"no prompt within {START_TIMEOUT:.0f} s") from None
        if not out.endswith(PROMPT):
            self.close()
            raise ShellUnavailable(why=out.decode(errors="replace").strip()[-200:] or "no prompt")

    def _exchange(self, text: str | None, deadline: float) -> tuple[bytes, bytes]:
        """Send one line (None: only read) and read until the prompt: (terminal bytes, report bytes)."""
        if text is not None:
            os.write(self.master, text.encode() + b"\n")
        out, rep = b"", b""
        while not out.endswith(PROMPT):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Late()
            ready, _, _ = select.select([self.master, self.report], [], [], left)
            if self.report in ready:
                rep += os.read(self.report, 1 << 16)
            if self.master in ready:
                chunk = os.read(self.master, 1 << 16)      # EIO once lvm has exited
                if not chunk:
                    raise OSError("lvm shell closed its terminal")
                out += chunk
                if QUESTION.search(out):                  # never agree to a question nobody asked for
                    os.write(self.master, b"n\n")
                    out += b"\n"
        while select.select([self.report], [], [], 0)[0]:
            chunk = os.read(self.report, 1 << 16)
            if not chunk:
                break
            rep += chunk
        return out, rep

    def run(self, argv: tuple[str, ...], text: str, timeout: float) -> Result:
        t0 = time.monotonic()
        with self.mutex:
            try:
                out, rep = self._exchange(text, t0 + timeout)
                doc = parse(rep)
                rc = status(doc)
                err = errors(parse(self._exchange("lastlog", t0 + timeout)[1])) if rc else ""
            except _Late:
                self.close()
                _record(argv, -1, "", f"timeout after {timeout}s (lvm shell)", time.monotonic() - t0, process=False)
                raise CommandTimeout(cmd=" ".join(argv), timeout=timeout) from None
            except (OSError, ValueError) as e:
                self.close()
                raise ShellUnavailable(why=f"{' '.join(argv)}: {e}") from None
            except BaseException:
                # interrupted mid-command (a signal unwinding the sync): its prompt would answer the
                # next command, so this shell is done, as subprocess.run kills its child then
                self.close()
                raise
        stdout = json.dumps({k: v for k, v in doc.items() if k != "log"}) if "report" in doc else ""
        return _record(argv, rc, stdout, err or ("" if not rc else out.decode(errors="replace")),
                       time.monotonic() - t0, process=False)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.pid == os.getpid()

    def _let_go(self) -> None:
        for fd in (self.master, self.report):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master = self.report = -1

    def close(self) -> None:
        """Stop the shell; in a forked child only drop the copies of its descriptors (the parent's
        shell is not the child's to stop, and would otherwise outlive the parent until the child exits)."""
        self._let_go()
        if self.pid != os.getpid():
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("lvm shell pid %s did not exit", self.proc.pid)


_mutex = threading.Lock()
_shell: Shell | None = None
_off_why = ""


def enabled() -> bool:
    return os.environ.get("RCOPY_LVM_SHELL", "1") not in ("0", "no", "off") and not _off_why


def get() -> Shell | None:
    """This process's shell, started on first use; None when it cannot run (then use processes)."""
    global _shell, _off_why
    if not enabled():
        return None
    with _mutex:
        if _shell is not None and not _shell.alive:
            _shell.close()
            _shell = None
        if _shell is None:
            try:
                _shell = Shell()
            except ShellUnavailable as e:
                _off_why = str(e)
                log.info("%s; LVM commands run as processes", e)
                return None
        return _shell


def stop() -> None:
    """Stop this process's shell (at exit; the next command would start another)."""
    global _shell
    with _mutex:
        if _shell is not None:
            _shell.close()
            _shell = None
