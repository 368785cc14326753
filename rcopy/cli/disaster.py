"""``rcopy group failover|recover|restore|reverse``: disaster recovery (3PAR ``setrcopygroup``).

Each asks for confirmation on a terminal (``-f`` skips it; without a terminal ``-f`` is required), and
is refused with its reason and its own exit code when roles or states do not allow it (rcopy.engine.roles).
"""
from __future__ import annotations

import sys

from rcopy.app import dr, progress
from rcopy.app.local import open_store
from rcopy.app.session import as_judged
from rcopy.cli.common import print_report
from rcopy.engine import roles
from rcopy.errors import Declined

_WHAT = {
    "failover": "make this system the source of group {g}: roll back a sync in flight, snapshot (F), make "
                "its volumes writable, fence {t}",
    "recover": "make {t} the receiver of group {g}: keep its writes since the last sync point (K), roll "
               "its volumes back, send the changes from here",
    "restore": "hand group {g} back to {t}: final sync from here (stop I/O here first), {t} becomes primary",
    "reverse": "turn group {g} ({how})",
}


def register(verbs):
    for verb, text in (("failover", "this (backup) system takes over the group: primary-rev"),
                       ("recover", "after a failover: the natural primary becomes secondary-rev, changes "
                                   "travel back by delta"),
                       ("restore", "after recover: final sync back, natural roles and direction again"),
                       ("reverse", "rename the roles (--natural) or turn a stopped group (--current)")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("group")
        p.add_argument("-f", "--yes", dest="yes", action="store_true", help="do not ask for confirmation")
        if verb == "reverse":
            how = p.add_mutually_exclusive_group(required=True)
            how.add_argument("--natural", dest="how", action="store_const", const="natural",
                             help="the present direction becomes the natural one (labels only)")
            how.add_argument("--current", dest="how", action="store_const", const="current",
                             help="swap the direction of a stopped group")
            p.add_argument("--local", action="store_true", help="this system only (repair a split state)")
        if verb in ("recover", "reverse"):
            p.add_argument("--force", action="store_true",
                           help="roll back volumes even if they are open (their users see the old data)")
        p.set_defaults(func=do_flow, verb=verb)


def confirm(text: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Declined(f"confirmation needed to {text.split(':')[0]}: run it on a terminal, or add -f")
    answer = input(f"{text}.\nType 'yes' to go on: ")
    if answer.strip().lower() != "yes":
        raise Declined("not confirmed: nothing was changed")


def do_flow(args):
    store = open_store()
    g = as_judged(store, args.group)
    how = getattr(args, "how", "")
    # refuse before asking: a question whose answer cannot matter is noise
    {"failover": roles.check_failover, "recover": roles.check_recover, "restore": roles.check_restore,
     "reverse": lambda g: roles.check_reverse(g, how)}[args.verb](g)
    confirm(_WHAT[args.verb].format(g=g.name, t=g.target, how=how), args.yes)
    if args.verb == "failover":
        out = dr.failover(store, g.name)
    elif args.verb == "recover":
        out = dr.recover(store, g.name, force=args.force, progress=progress.for_terminal())
    elif args.verb == "restore":
        out = dr.restore(store, g.name, progress=progress.for_terminal())
    else:
        out = dr.reverse(store, g.name, how, local=args.local, force=args.force)
    for line in out.lines:
        print(line)
    if out.report is not None:
        print_report(out.report)
    return 0
