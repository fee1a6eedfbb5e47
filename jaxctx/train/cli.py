"""The command line of `python train.py` and `jaxctx train` (no jax import here: --help is instant).

This module owns parsing and the guarded start; the job itself is jaxctx.train.loop.run, imported when a run
starts (the loop never imports this module, so there is no import circle).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment file (default: the embedded default, see config.py)")
    parser.add_argument("--workdir", help="run directory (default: workdirs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=100 (repeatable)")


def parse_args(argv=None) -> argparse.Namespace:
    """`python train.py`'s arguments."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train a jaxctx model.")
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """`python train.py [--config FILE] [--workdir DIR] [--set key=value ...]`: the exit status."""
    return run_from_args(parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Load the config, start the job; a user's mistake is one line on stderr and exit code 2."""
    from jaxctx.cli import run_guarded

    return run_guarded("train.py", _start, args)


def _start(args: argparse.Namespace) -> int:
    from jaxctx import config as config_lib
    from jaxctx.train.loop import default_workdir, maybe_initialize_distributed, run

    cfg = config_lib.load(args.config, args.overrides)
    maybe_initialize_distributed(cfg.parallel)
    return run(cfg, args.workdir or default_workdir(args.config))


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (same as python train.py)")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    return run_from_args(args)
