"""``rcopy extents OLD NEW``: the changed extents between two snapshots of one volume — what a delta
sync would send. The back-end is chosen from what OLD and NEW are (thin LVs: thin_delta; dm-snapshots:
the COW table; files: full compare), then refined block by block."""
from __future__ import annotations

import json
import sys

from rcopy.errors import Refused, UsageError


def register(sub) -> None:
    p = sub.add_parser("extents", help="show the changed extents between two snapshots of one volume",
                       description=__doc__.split("\n\n")[0].replace("``", "'"))
    p.add_argument("old", metavar="OLD", help="the older snapshot (device path or file)")
    p.add_argument("new", metavar="NEW", help="the newer snapshot of the same volume")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--block-size", type=int, default=4096, metavar="N",
                   help="compare granularity in bytes, a power of two >= 512 (default 4096)")
    p.set_defaults(func=run)


def changed_extents(old_path: str, new_path: str, block_size: int):
    """(backend, extents): the pure part of the command, beside its printing (borg's habit)."""
    from rcopy import backends
    from rcopy.snapshot.select import snapshot_at

    if block_size < 512 or block_size & (block_size - 1):
        raise UsageError(f"--block-size {block_size} must be a power of two of at least 512")
    old, new = snapshot_at(old_path), snapshot_at(new_path)
    if old.backend != new.backend:
        raise Refused(f"{old_path} is a {old.backend} snapshot but {new_path} is {new.backend}: "
                      f"give two snapshots of one volume")
    if old.backend != "file" and old.origin != new.origin:
        raise Refused(f"{old_path} and {new_path} are snapshots of different volumes "
                      f"({old.origin}, {new.origin})")
    return old.backend, list(backends.get(old.backend).changes.changed(old, new, block_size=block_size))


def run(args) -> int:
    backend, extents = changed_extents(args.old, args.new, args.block_size)
    data = sum(e.length for e in extents if not e.zero)
    zero = sum(e.length for e in extents if e.zero)
    if args.json:
        json.dump({"old": args.old, "new": args.new, "backend": backend, "block_size": args.block_size,
                   "data_bytes": data, "zero_bytes": zero, "extents": [e.as_dict() for e in extents]},
                  sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{'OFFSET':>14} {'LENGTH':>12} KIND")
    for e in extents:
        print(f"{e.offset:>14} {e.length:>12} {'zero' if e.zero else 'data'}")
    print(f"{len(extents)} extents ({backend}): {data} bytes of data, {zero} bytes of zeroes")
    return 0
