"""The one ``dv365`` command. Sub-commands are registered by modules of every installed dv365 package.

dv365-core registers its own (``import``, ``synth``, ``slice``); every other package and application
(``train``, ``export``, ``pipeline``, ``serve``, ``eval``, ``bench``, ``demo``, ...) plugs its commands in through
the ``dv365.commands`` entry-point group, whose values are callables ``register(subparsers) -> None`` that add a
parser and ``set_defaults(func=handler)``; ``handler(args)`` returns an exit code. Handlers import their heavy
modules lazily so ``dv365 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dv365.core.__about__ import __version__
from dv365.core.errors import Dv365Error
from dv365.core.plugins import iter_plugins, load_ref

# module:function pairs of dv365-core's own commands
CORE_COMMANDS = (
    "dv365.core.importers.cli:register",
    "dv365.core.synth:register",
    "dv365.core.slicing.cli:register",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dv365",
        description=(
            "DV365: extremely long user histories -> compact offline user embeddings.\n"
            "Import timelines, generate long-history data, slice timelines into ~200 features, run benchmarks.\n"
            "Run `dv365 <command> --help` for each command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dv365-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for ref in CORE_COMMANDS:
        load_ref(ref)(sub)
    for _name, register in iter_plugins("dv365.commands"):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Dv365Error as e:
        print(f"dv365 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dv365 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
