"""The `jaxctx` command: one subcommand per job, each registered by the module that owns it.

Each command module exposes `register(subparsers)`, adding its parser and setting `func=<callable(args)->int>`.
Importing a command module must stay cheap (no jax work at import), so `jaxctx --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> registers one or more subcommands. Order is the order shown in --help.
COMMAND_MODULES = (
    "jaxctx.train.cli",
    "jaxctx.bench.cli",
    "jaxctx.data.cli",
    "jaxctx.convert.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxctx", description="Long-context transformer training in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User errors (bad config, missing files, bad shapes) print one clear line, not a traceback.
        print(f"jaxctx {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
