"""rcopy's entry point: builds the parser from the noun modules and funnels every error.

Each noun module (target, group, sync, status, extents, ...) exposes ``register(subparsers)``; its
handlers return an exit code (or None for 0). Every RcopyError becomes one line on stderr and its exit
code; anything else is a bug: one line plus a pointer to ``--debug``, exit 1. ``--debug`` adds the
flight recorder of recent commands and the traceback (an RcopyError still ends with its line and
its exit code; a bug is re-raised).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from rcopy import __version__
from rcopy.errors import RcopyError, UsageError

# Noun modules, in help order. A module that does not exist yet is skipped, so nouns can land one at a time.
NOUNS = ("target", "link", "group", "sync", "status", "metrics", "verify", "extents", "agent", "daemon")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so usage errors take the one funnel."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def noun_of(argv: list[str]) -> str | None:
    """The command word of ``argv`` (the first word that is not a global option), or None."""
    words = iter(argv)
    for a in words:
        if a == "--state-dir":
            next(words, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(only: str | None = None, nouns: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a known noun) just that noun's, so a command imports only its own
    module (``rcopy agent``, run by ssh for every sync, starts in a fraction of the time); with
    ``nouns=False`` none (``rcopy --version``: 1 s instead of 4 under the lab's emulation)."""
    p = _Parser(prog="rcopy", description="Snapshot-based asynchronous block replication (3PAR Remote Copy periodic mode).")
    p.add_argument("--version", action="version", version=f"rcopy {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and the recent commands run")
    p.add_argument("--state-dir", default=None, help="state directory (default $RCOPY_STATE_DIR or /var/lib/rcopy)")
    sub = p.add_subparsers(dest="noun", metavar="COMMAND", parser_class=_Parser)
    for name in NOUNS:
        if not nouns or (only in NOUNS and name != only):
            continue
        try:
            mod = importlib.import_module(f"rcopy.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"rcopy.cli.{name}":
                raise
            continue
        mod.register(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=("rcopy: %(relativeCreated)6.0fms " if debug else "rcopy: ") +
                        "%(levelname)s %(name)s: %(message)s")
    try:
        from rcopy.app.signals import unwind_on_signals
        unwind_on_signals()
        noun = noun_of(argv)
        parser = build_parser(noun, nouns=noun is not None or "--version" not in argv)
        args = parser.parse_args(argv)
        if args.state_dir:
            os.environ["RCOPY_STATE_DIR"] = args.state_dir
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if args.noun is None else 2
        rc = args.func(args)
        return 0 if rc is None else int(rc)
    except RcopyError as e:
        if debug:   # the traceback for whoever asked, then the same line and exit code as without it
            _print_recorder()
            traceback.print_exc()
        print(f"rcopy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rcopy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as e:  # a bug: never a traceback for the user unless asked
        if debug:
            _print_recorder()
            raise
        print(f"rcopy: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1


def _print_recorder():
    from rcopy.sys.run import recent

    for r in recent():
        print(f"rcopy: recent: rc={r.rc} {' '.join(r.argv)}", file=sys.stderr)
