"""Fault points for tests: ``RCOPY_FAULT=<point>`` makes the process exit at once at that point.

Tests of the crash windows (rcopy/engine/DESIGN.md) set it to kill the primary's rcopy or the backup's
agent exactly where a power cut or SIGKILL could land; ``os._exit`` runs no cleanup, like SIGKILL.
Points: primary ``after-record-begin``, ``in-cut`` (every origin suspended, no snapshot taken),
``after-cut``, ``after-send``, ``after-peer-commit``, ``after-commit``; agent ``agent-at-status``,
``agent-at-begin``, ``agent-stalls-in-begin`` (not an exit: ``cut_unnoticed``), ``agent-after-begin``,
``agent-before-commit``, ``agent-after-commit``, ``agent-before-tidy``; disaster recovery
(rcopy.app.dr) ``dr-after-takeover-cut``, ``dr-after-keep-cut``, ``dr-after-one-rollback``,
``dr-after-handover``.
"""
from __future__ import annotations

import logging
import os
import select

log = logging.getLogger("rcopy.faults")


def point(name: str, code: int = 99) -> None:
    if os.environ.get("RCOPY_FAULT") == name:
        log.warning("RCOPY_FAULT=%s: exiting here on purpose", name)
        os._exit(code)


def cut_unnoticed(name: str, listener=None, seconds: float = 30.0) -> None:
    """At ``name`` the link under this agent dies and nothing here notices, as with ssh on a cut link:
    the primary sees its channel end (our stdout goes nowhere from now), our stdin never ends. Go on
    once a connection waits on ``listener`` (the primary's next agent coming for this sync), or after
    ``seconds``."""
    if os.environ.get("RCOPY_FAULT") != name:
        return
    log.warning("RCOPY_FAULT=%s: the link dies unnoticed here", name)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    r, _w = os.pipe()            # the write end stays open with this process: stdin never ends
    os.dup2(r, 0)
    os.close(r)
    if listener is not None:
        select.select([listener], [], [], seconds)
