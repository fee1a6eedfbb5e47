"""Train a jaxctx model: `python train.py [--config FILE] [--workdir DIR] [--set key=value ...]`.

Thin entry point: the command line is jaxctx.train.cli, the job jaxctx.train.loop (also `jaxctx train`).
"""

import sys

from jaxctx.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
