"""What the noun modules share for output; the work itself is in rcopy.app."""
from __future__ import annotations

import json


def print_json(obj):
    print(json.dumps(obj, indent=2, sort_keys=True))


def print_report(report):
    if report.confirmed:
        print(f"group {report.group}: nothing written since sync point {report.generation}: confirmed current "
              f"in {report.seconds:.1f} s (no snapshot, nothing sent)")
        return
    full = [f"{v} ({why})" for v, (_, why) in report.volumes.items() if why]
    print(f"group {report.group}: sync point {report.generation} committed, {report.bytes_sent} bytes sent "
          f"in {report.seconds:.1f} s" + (f"; full: {', '.join(full)}" if full else ""))


def start_sync(store, group: str, *, event, full: str = "", wait: bool = False, started=None) -> int:
    """``sync`` and ``group start``: in the foreground with progress, or detached (3PAR's default).
    ``started``: the agent rcopy.app.reach.start_early began for it."""
    from rcopy.app import progress, session
    if wait:
        print_report(session.launch(store, group, event=event, full=full, progress=progress.for_terminal(),
                                    wait=True, started=started))
        return 0
    g = store.group(group)
    session.launch(store, group, event=event, full=full)
    print(f"group {group}: sync point {g.generation + 1} started; follow it with 'rcopy status groups {group}'")
    return 0
