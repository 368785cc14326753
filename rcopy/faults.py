"""Fault points for tests: ``RCOPY_FAULT=<point>`` makes the process exit at once at that point.

Tests of the crash windows (rcopy/engine/DESIGN.md) set it to kill the primary's rcopy or the backup's
agent exactly where a power cut or SIGKILL could land; ``os._exit`` runs no cleanup, like SIGKILL.
Points: primary ``after-record-begin``, ``in-cut`` (every origin suspended, no snapshot taken),
``after-cut``, ``after-send``, ``after-peer-commit``, ``after-commit``; agent ``agent-at-status``,
``agent-at-begin``, ``agent-after-begin``, ``agent-before-commit``, ``agent-after-commit``,
``agent-before-tidy``; disaster recovery (rcopy.app.dr) ``dr-after-takeover-cut``, ``dr-after-keep-cut``,
``dr-after-one-rollback``, ``dr-after-handover``.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("rcopy.faults")


def point(name: str, code: int = 99) -> None:
    if os.environ.get("RCOPY_FAULT") == name:
        log.warning("RCOPY_FAULT=%s: exiting here on purpose", name)
        os._exit(code)
