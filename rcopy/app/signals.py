"""How rcopy's processes take SIGTERM: as Ctrl-C, so every ``finally`` on the way out runs.

Apart from rcopy.app.session so that the CLI's entry point sets it without importing the engine (an
agent, started by ssh for every sync, needs none of it: its start-up is part of every sync's cost).
"""
from __future__ import annotations

import signal


def unwind_on_signals():
    """SIGTERM (systemd stop, kill) unwinds like Ctrl-C: a cut in progress resumes its origins in its
    ``finally`` and the sync in flight is aborted (rolled back on the backup) instead of dying mid-way."""
    def _interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)
