"""`jaxctx train` and the shared command line of `python train.py` (no jax import here: --help is instant)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment file (default: the embedded default, see config.py)")
    parser.add_argument("--workdir", help="run directory (default: workdirs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=100 (repeatable)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (same as python train.py)")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from jaxctx.train.loop import run_from_args
    return run_from_args(args)
