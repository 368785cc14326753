"""``rcopy link add|remove TARGET ADDR``: the replication links of a target (3PAR RCIP links)."""
from __future__ import annotations

from rcopy.app.local import open_store
from rcopy.model import check_link


def register(sub):
    p = sub.add_parser("link", help="add or remove replication links of a target")
    s = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, fn, text in (("add", do_add, "add a link address to a target"),
                           ("remove", do_remove, "remove a link address from a target")):
        c = s.add_parser(verb, help=text)
        c.add_argument("target")
        c.add_argument("address")
        c.set_defaults(func=fn)


def do_add(args):
    open_store().add_link(args.target, check_link(args.address))
    print(f"link {args.address} added to target {args.target}")


def do_remove(args):
    open_store().remove_link(args.target, args.address)
    print(f"link {args.address} removed from target {args.target}")
