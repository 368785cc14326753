"""The one place rcopy runs external programs.

Every subprocess goes through :func:`run`: it forces ``LC_ALL=C`` so tools print what parsers expect,
never goes through a shell, applies a timeout, and keeps the last commands in a ring buffer (the flight
recorder) that ``rcopy status --debug`` and crash reports print (blivet ``util._run_program``, lvmdbusd's
flight recorder). Wrappers in rcopy.sys turn a failed :class:`Result` into their own typed error.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import logging
import os
import subprocess
import threading
import time

from rcopy.errors import ToolError

log = logging.getLogger("rcopy.run")

_RECORDER_SIZE = 64
_recorder: collections.deque = collections.deque(maxlen=_RECORDER_SIZE)
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


class CommandNotFound(ToolError):
    """{tool} is not installed: install the package that provides it"""


class CommandTimeout(ToolError):
    """{cmd} did not finish within {timeout} s"""


def _env() -> dict:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def run(argv, *, input: str | bytes | None = None, timeout: float = 120.0, check: bool = False,
        error: type[ToolError] = ToolError) -> Result:
    """Run argv (a sequence, never a shell string); return its Result.

    With check=True a non-zero exit raises ``error`` carrying the command, code and stderr.
    """
    argv = tuple(str(a) for a in argv)
    t0 = time.monotonic()
    text = not isinstance(input, bytes)
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, env=_env(),
                            text=text, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandNotFound(tool=argv[0]) from None
    except subprocess.TimeoutExpired:
        _record(argv, -1, "", f"timeout after {timeout}s", time.monotonic() - t0)
        raise CommandTimeout(cmd=" ".join(argv), timeout=timeout) from None
    out = cp.stdout if text else cp.stdout.decode(errors="replace")
    err = cp.stderr if text else cp.stderr.decode(errors="replace")
    res = _record(argv, cp.returncode, out, err, time.monotonic() - t0)
    if check and not res.ok:
        raise error(describe(res))
    return res


def spawn(argv, *, stderr_path: str | None = None) -> subprocess.Popen:
    """Start a long-running program (a server such as nbdkit) without waiting for it; the caller owns
    the returned process and must stop it. stdin/stdout are /dev/null; stderr goes to stderr_path (so a
    failed start can be explained) or /dev/null. Recorded in the flight recorder with its pid."""
    argv = tuple(str(a) for a in argv)
    err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=_env())
    except FileNotFoundError:
        raise CommandNotFound(tool=argv[0]) from None
    finally:
        if stderr_path:
            err.close()
    _record(argv, 0, f"spawned pid {proc.pid}", "", 0.0)
    return proc


def describe(res: Result) -> str:
    """One line naming the command, its exit code and the last line of its stderr."""
    last = (res.stderr.strip().splitlines() or ["(no message)"])[-1].strip()
    return f"{' '.join(res.argv)} failed (exit {res.rc}): {last}"


class Ledger:
    """Counts the external commands run inside a ``with ledger():`` block (rcopy status reports them
    per sync: on real hardware each LVM command costs 50-300 ms, in the TCG lab 0.3-1 s), and of those
    the ``processes`` started (an LVM command in the process's lvm shell starts none)."""

    def __init__(self):
        self.commands = 0
        self.processes = 0
        self.by_tool: collections.Counter = collections.Counter()
        self._mutex = threading.Lock()

    def add(self, argv: tuple[str, ...], process: bool = True):
        tool = argv[1] if argv and argv[0] == "lvm" and len(argv) > 1 else (argv[0] if argv else "?")
        with self._mutex:
            self.commands += 1
            self.processes += process
            self.by_tool[os.path.basename(tool)] += 1

    def as_dict(self) -> dict:
        """What a sync report carries: ``commands``, ``processes``, ``commands_by_tool``."""
        return {"commands": self.commands, "processes": self.processes, "commands_by_tool": dict(self.by_tool)}


_ledger: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar("rcopy_ledger", default=None)


@contextlib.contextmanager
def ledger(book: Ledger | None = None):
    """Count the commands this context (and threads started with its copied context) runs, into
    ``book`` (continued) or a new Ledger."""
    book = book or Ledger()
    token = _ledger.set(book)
    try:
        yield book
    finally:
        _ledger.reset(token)


def _record(argv, rc, out, err, seconds, *, process: bool = True) -> Result:
    res = Result(argv, rc, out, err, seconds)
    book = _ledger.get()
    if book is not None:
        book.add(tuple(argv), process)
    with _lock:
        _recorder.append(res)
    log.debug("ran %s rc=%s in %.3fs%s", " ".join(argv), rc, seconds,
              f" stderr={err.strip()!r}" if rc else "")
    return res


def recent() -> list[Result]:
    """The flight recorder: the last commands run by this process, oldest first."""
    with _lock:
        return list(_recorder)
