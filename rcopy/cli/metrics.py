"""``rcopy metrics``: this system's groups, volumes, links and alerts in Prometheus text exposition
format (rcopy.app.metrics lists the metrics); the daemon writes the same to ``--metrics-file``."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("metrics", help="print lag, last sync figures, states and alerts for Prometheus")
    p.set_defaults(func=do_metrics)


def do_metrics(args):
    from rcopy.app import metrics
    from rcopy.app.local import open_store
    sys.stdout.write(metrics.render(open_store()))
    return 0
