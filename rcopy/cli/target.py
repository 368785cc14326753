"""``rcopy target create|remove|list``: the peer systems this one replicates to (3PAR creatercopytarget)."""
from __future__ import annotations

import os

from rcopy.app.local import open_store
from rcopy.cli.common import print_json
from rcopy.model import Target, check_link, check_name


def register(sub):
    p = sub.add_parser("target", help="define the systems this one replicates to")
    s = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = s.add_parser("create", help="define a target: its links and how to reach its agent")
    c.add_argument("name")
    c.add_argument("--link", action="append", required=True, metavar="ADDR",
                   help="address of a replication link to the target (repeat for several)")
    c.add_argument("--agent", metavar="CMD",
                   help=f"command running the target's agent on stdio; {{link}} is replaced by the link "
                        f"(default: '{Target.DEFAULT_AGENT}')")
    c.set_defaults(func=do_create)
    r = s.add_parser("remove", help="forget a target (refused while a group uses it)")
    r.add_argument("name")
    r.set_defaults(func=do_remove)
    ls = s.add_parser("list", help="list targets")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=do_list)


def do_create(args):
    store = open_store()
    links = tuple(dict.fromkeys(check_link(a) for a in args.link))
    store.add_target(Target(check_name("target", args.name), links, args.agent))
    print(f"target {args.name} created with link(s) {', '.join(args.link)}")
    if not args.agent:
        print(authorized_keys_hint(args.name))


def authorized_keys_hint(target: str) -> str:
    """The line that lets this system's root key run rcopy's agent on the target and nothing else."""
    import glob
    keys = sorted(glob.glob(os.path.expanduser("~/.ssh/id_*.pub")))
    key = open(keys[0]).read().strip() if keys else "<this system's root public key, e.g. ~/.ssh/id_ed25519.pub>"
    return (f"to let this system reach {target}'s agent and nothing else, add to /root/.ssh/authorized_keys "
            f"on {target}:\n  restrict,command=\"rcopy agent\" {key}")


def do_remove(args):
    open_store().remove_target(args.name)
    print(f"target {args.name} removed")


def do_list(args):
    targets = open_store().targets()
    if args.json:
        print_json([{"name": t.name, "links": list(t.links), "agent": t.agent_template} for t in targets])
        return
    for t in targets:
        print(f"{t.name}\t{','.join(t.links)}\t{t.agent_template}")
