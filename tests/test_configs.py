"""Every shipped config parses, validates, and builds the model its header promises (abstractly: no memory)."""

import glob
import math
import os

import jax
import jax.numpy as jnp
import pytest

from jaxctx import config as config_lib
from jaxctx import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# name -> (family, parameter count range in millions)
EXPECTED = {
    "default": ("gpt2", 0.3, 1.0),
    "tiny": ("gpt2", 0.05, 0.5),
    "gpt2-124m-8k": ("gpt2", 123, 135),  # 124M + the longer position table
    "gpt2-124m-32k": ("gpt2", 140, 150),  # 32K learned positions add 25M
    "llama-1b-64k": ("llama", 1200, 1300),
    "bert-base-4k": ("bert", 110, 115),
    "bench-gpt2-6x512": ("gpt2", 45, 48),  # 6 x 512 blocks (18.9M) + 50304 x 512 tokens + 4096 x 512 positions
    "bench-mfu-4x256": ("gpt2", 7, 8),  # 4 x 256 blocks (3.2M) + 16384 x 256 positions (4.2M)
    "finetune-stdlib-package": ("gpt2", 0.3, 1.0),  # the default model's backbone + an 11-class head
    "finetune-stdlib-tokens": ("gpt2", 0.3, 1.0),
    "extend-llama-1k": ("llama", 0.5, 1.0),  # the 2 x 128 llama of `python train.py --set model.family=llama`
    "passkey-llama-256": ("llama", 0.5, 1.0),  # 2 x 128 llama, stage 1 of the passkey recipe
    "passkey-llama-1k": ("llama", 0.5, 1.0),  # the same model, stage 2 at 1024 tokens
    "passkey-llama-4k": ("llama", 0.5, 1.0),  # the same model, the 4096-token runs
}


def test_every_config_is_listed():
    assert {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds_its_model(path):
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = config_lib.load(path)
    family, low, high = EXPECTED[name]
    assert cfg.model.family == family
    with open(path) as f:
        header = f.read().split("\n\n")[0]
    assert "Hardware:" in header and "Command:" in header and "Expected:" in header
    model = models.build(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) / 1e6
    assert low <= count <= high, f"{name}: {count:.1f}M params"


def test_default_yaml_equals_the_embedded_default():
    assert config_lib.load(os.path.join(ROOT, "configs", "default.yaml")) == config_lib.load(None)
