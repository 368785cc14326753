"""Errors of the lab, in rcopy's one error tree so scripts/lab prints one line and an exit code."""
from __future__ import annotations

from rcopy.errors import ToolError, UsageError


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
