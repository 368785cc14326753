"""``rcopy target create|set|remove|list``: the peer systems this one replicates to (3PAR creatercopytarget,
setrcopytarget)."""
from __future__ import annotations

import os

from rcopy.app.local import open_store
from rcopy.cli.common import print_json
from rcopy.errors import UsageError
from rcopy.model import LINK_TIMEOUT, TARGET_TIMEOUT, Target, check_link, check_name, check_timeout


def _timeouts(parser, default: bool):
    parser.add_argument("--link-timeout", type=int, metavar="S", default=LINK_TIMEOUT if default else None,
                        help=f"seconds without an answer before a link is down (default {LINK_TIMEOUT})")
    parser.add_argument("--target-timeout", type=int, metavar="S", default=TARGET_TIMEOUT if default else None,
                        help=f"seconds after its last link went down before the target has failed and its "
                             f"agent rolls back an open sync (default {TARGET_TIMEOUT})")
    parser.add_argument("--ssh-persist", type=int, metavar="S", default=0 if default else None,
                        help="keep one ssh connection per link open S seconds after its last use, so a "
                             "sync within that time skips the ssh login (0: off, the default; a link "
                             "that dies meanwhile is noticed after the link timeout)")


def _checked(args) -> dict:
    out = {}
    if args.link_timeout is not None:
        out["link_timeout"] = check_timeout("link timeout", args.link_timeout, 5)
    if args.target_timeout is not None:
        out["target_timeout"] = check_timeout("target timeout", args.target_timeout, 10)
    if args.ssh_persist is not None:                 # 0 turns it off; anything else is a duration
        out["ssh_persist"] = check_timeout("ssh persist", args.ssh_persist, 10) if args.ssh_persist else 0
    return out


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
    _timeouts(c, default=True)
    c.set_defaults(func=do_create)
    st = s.add_parser("set", help="change a target's link and target timeouts and ssh sharing")
    st.add_argument("name")
    _timeouts(st, default=False)
    st.set_defaults(func=do_set)
    r = s.add_parser("remove", help="forget a target (refused while a group uses it)")
    r.add_argument("name")
    r.set_defaults(func=do_remove)
    ls = s.add_parser("list", help="list targets")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=do_list)


def do_create(args):
    store = open_store()
    links = tuple(dict.fromkeys(check_link(a) for a in args.link))
    store.add_target(Target(check_name("target", args.name), links, args.agent, **_checked(args)))
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


def do_set(args):
    changes = _checked(args)
    if not changes:
        raise UsageError("rcopy target set: give --link-timeout, --target-timeout and/or --ssh-persist")
    t = open_store().set_target_options(args.name, **changes)
    share = f"ssh connections kept {t.ssh_persist} s" if t.ssh_persist else "ssh connections not kept"
    print(f"target {t.name}: link timeout {t.link_timeout} s, target timeout {t.target_timeout} s, {share} "
          f"(from the next sync's session)")


def do_remove(args):
    open_store().remove_target(args.name)
    print(f"target {args.name} removed")


def do_list(args):
    targets = open_store().targets()
    if args.json:
        print_json([{"name": t.name, "links": list(t.links), "agent": t.agent_template,
                     "link_timeout": t.link_timeout, "target_timeout": t.target_timeout,
                     "ssh_persist": t.ssh_persist} for t in targets])
        return
    for t in targets:
        share = f"\tssh kept {t.ssh_persist}s" if t.ssh_persist else ""
        print(f"{t.name}\t{','.join(t.links)}\t{t.link_timeout}s/{t.target_timeout}s{share}\t{t.agent_template}")
