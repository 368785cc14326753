"""Errors of the lab, in rcopy's one error tree so scripts/lab prints one line and an exit code."""
from __future__ import annotations

import sys

from rcopy.errors import RcopyError, ToolError, UsageError


class LabError(ToolError):
    """lab: {msg}"""


class LabUsage(UsageError):
    """lab: {msg}"""


class BootFailed(LabError):
    """lab: {host} did not answer on ssh within {seconds} s; its console: {console}"""


class NotRunning(LabError):
    """lab: {host} is not running: run 'scripts/lab up' (or 'scripts/lab start {host}' after a crash)"""


class GuestHung(LabError):
    """lab: '{cmd}' in {host} gave no answer within {timeout} s: the guest looks hung, not rcopy (console: {console})"""


class GuestCommandFailed(LabError):
    """lab: '{cmd}' failed in {host} (exit {rc}): {last}"""


def one_line(prog: str, verb) -> int:
    """Run a command line's verb (a callable returning the exit code): any failure is one line on stderr
    and an exit code (rcopy's own for its errors, 130 for ^C, 1 for a bug here), never a traceback."""
    try:
        return verb()
    except RcopyError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # a bug in the lab's code: still one line
        print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
