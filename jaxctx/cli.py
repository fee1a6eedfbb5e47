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
    "jaxctx.generate.cli",
    "jaxctx.evaluate.cli",
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
    return run_guarded(f"jaxctx {args.command}", args.func, args)


def run_guarded(prog: str, func, *args) -> int:
    """Run an entry point: a user's mistake prints one line and exits 2; a bug keeps its traceback.

    User mistakes are `jaxctx.errors.UserError` and the OS errors about a path the user named (missing, a
    directory where a file was expected, no permission): they get `PROG: error: MESSAGE`. Any other exception
    propagates with its traceback, because it is a jaxctx bug the user should be able to report.
    """
    from jaxctx.errors import UserError, report_user_error

    try:
        return int(func(*args) or 0)
    except UserError as err:
        return report_user_error(prog, err)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        return report_user_error(prog, err)


if __name__ == "__main__":
    sys.exit(main())
