"""Dropout in training: on only in the train step, a function of (train.seed, step), the same on any mesh.

Runner-level steps on synthetic packed batches (no data pipeline) for the mesh comparisons; the training loop
for checkpoint-and-resume. The kernels' masks are tested in tests/ops/test_dropout.py.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx import models
from jaxctx.config import ConfigError
from jaxctx.parallel import make_mesh
from jaxctx.train.loop import run
from jaxctx.train.runner import make_runner
from jaxctx.train.step import loss_sums, make_train_step

# Tests here compile the same steps again and again: tests/conftest.py's persistent cache compiles each once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
T = 64
DROP = ("model.dropout=0.1", "model.attention_dropout=0.2")


def _cfg(*overrides):
    return config_lib.load(TINY, ["data.seq_len=64", "train.batch_size=4", "model.num_heads=4", *overrides])


def _batches(n, b=4, t=T):
    """Packed rows: two documents each (positions restart), a few padding tokens scored 0."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(3, 250, (b, t)).astype(np.int32)
        seg = np.ones((b, t), np.int32)
        seg[:, 23:] = 2
        seg[:, -3:] = 0
        pos = np.where(seg == 1, np.arange(t), np.arange(t) - 23).astype(np.int32)
        out.append({"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": (seg > 0).astype(np.float32),
                    "segment_ids": seg, "positions": pos})
    return out


def _losses(cfg, devices, steps=3):
    runner = make_runner(cfg, make_mesh(cfg.parallel, devices))
    state = runner.init(cfg.train.seed)
    losses = []
    for batch in _batches(steps):
        state, metrics = runner.step(state, runner.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_dropout_only_with_a_key_and_the_key_decides(family):
    cfg = _cfg(f"model.family={family}", *DROP)
    model = models.build(cfg)
    batch = jax.tree.map(jax.numpy.asarray, _batches(1)[0])
    params = model.init(jax.random.PRNGKey(0), batch["input_ids"])["params"]
    plain_model = models.build(_cfg(f"model.family={family}"))
    plain = jax.jit(lambda p, b: loss_sums(plain_model, p, b)[0])(params, batch)
    assert jax.jit(lambda p, b: loss_sums(model, p, b)[0])(params, batch) == plain  # no key: no dropout at all
    keyed = jax.jit(lambda p, b, k: loss_sums(model, p, b, k)[0])
    dropped = keyed(params, batch, jax.random.PRNGKey(1))
    assert dropped != plain and keyed(params, batch, jax.random.PRNGKey(1)) == dropped
    assert keyed(params, batch, jax.random.PRNGKey(2)) != dropped


def test_rate_zero_step_is_the_plain_step_bit_for_bit():
    cfg = _cfg()
    runner = make_runner(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    state = runner.init(0)
    batch = runner.put_batch(_batches(1)[0])
    plain = jax.jit(make_train_step(runner.model, runner.optimizer, runner.schedule, 1))(state, batch)
    keyed = jax.jit(make_train_step(runner.model, runner.optimizer, runner.schedule, 1, dropout_seed=0))(state,
                                                                                                    batch)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(keyed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("family,parallel,n", [
    ("gpt2", ("parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"), 8),
    ("bert", ("parallel.sequence=4", "parallel.data=2", "train.grad_accum=2"), 8),
], ids=["gpt2-2x2x2", "bert-sequence4-data2-accum2"])
def test_dropout_losses_equal_on_one_device_and_a_sharded_mesh(family, parallel, n):
    extra = tuple(p for p in parallel if p.startswith("train."))
    one = _losses(_cfg(f"model.family={family}", *DROP, *extra), jax.devices()[:1])
    sharded = _losses(_cfg(f"model.family={family}", *DROP, *parallel), jax.devices()[:n])
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)
    assert not np.allclose(one, _losses(_cfg(f"model.family={family}", *extra), jax.devices()[:1]), atol=1e-4)


def _loop_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    base = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "data.validation_fraction=0",
            "model.family=bert", *DROP)
    assert run(_cfg(*base), str(tmp_path / "whole"), devices=jax.devices()[:1]) == 0
    assert run(_cfg(*base, "train.stop_after=3"), str(tmp_path / "split"), devices=jax.devices()[:1]) == 0
    assert run(_cfg(*base), str(tmp_path / "split"), devices=jax.devices()[:1]) == 0
    whole, split = _loop_losses(tmp_path / "whole"), _loop_losses(tmp_path / "split")
    assert [s for s, _ in whole] == list(range(1, 7)) and split == whole  # the floats as logged: bit for bit


@pytest.mark.parametrize("override,message", [
    ("model.dropout=1.0", r"model.dropout=1.0 must be in \[0, 1\)"),
    ("model.attention_dropout=-0.1", r"model.attention_dropout=-0.1 must be in \[0, 1\)"),
])
def test_bad_rates_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(override)
    with pytest.raises(ConfigError, match="HF LLaMA has no hidden dropout"):
        _cfg("model.family=llama", "model.dropout=0.1")
