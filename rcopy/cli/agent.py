"""``rcopy agent``: the control protocol on stdin/stdout, what a primary runs on its target (over ssh)."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("agent", help="serve the control protocol on stdio (run by the peer, not by hand)")
    p.set_defaults(func=do_agent)


def do_agent(args):
    from rcopy.app.agent import serve
    from rcopy.app.local import open_store

    return serve(open_store(), sys.stdin, sys.stdout)
