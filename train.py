"""Train a jaxctx model: `python train.py [--config FILE] [--workdir DIR] [--set key=value ...]`.

Thin entry point; everything lives in jaxctx.train.loop (also reachable as `jaxctx train`).
"""

import sys

from jaxctx.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
