"""What one more token of context costs a whole train step, from XLA's compiled memory analysis (deterministic).

The blockwise GPT-2 step (blockwise attention, chunked MLP and loss, full remat) must stay O(T) with a small
constant: measured in units of one float32 [T, D] array, the slope of total step memory (arguments + outputs -
aliased + temp) between T=4096 and T=8192. With 4 layers that is 4 saved layer inputs + 4 for the learned position
table (param, grad, two Adam moments) + one layer's forward/backward working set. History on this config:
27.4 (MLP/loss chunks copied to [N, B, C, D], non-finite guard copying the Adam moments), 25.9 (in-place chunks,
guard as lax.cond), 21.3 (zero buffers made inside their loops, embedding gradient zeros made in the backward),
17.2 (norm VJPs that keep only per-row statistics and wait for dy; mlp_norm applied inside the MLP chunks).
"""

import jax
import pytest

from jaxctx import config as config_lib
from jaxctx.bench.trainstep import compile_step, config_at


def _step_bytes(base, t):
    return compile_step(config_at(base, seq_len=t, batch=1), devices=jax.devices()[:1]).memory.total_bytes


def _arrays_per_token(*overrides):
    base = config_lib.load("configs/tiny.yaml", [
        "train.grad_accum=1", "data.seq_len=4096", "model.attention=blockwise", "model.mlp_chunk=512",
        "model.loss_chunk=512", "model.remat_policy=full", *overrides])
    small, large = _step_bytes(base, 4096), _step_bytes(base, 8192)
    return (large - small) / 4096 / (base.model.d_model * 4)  # in f32 [T, D] arrays per token


def test_blockwise_step_costs_few_activations_per_token():
    assert _arrays_per_token("model.num_layers=4") <= 18.5


@pytest.mark.slow
def test_remat_groups_save_layer_inputs():
    """8 layers in groups of 4: the backward holds 2 group inputs + 4 layer inputs instead of 8."""
    per_layer = _arrays_per_token("model.num_layers=8")
    grouped = _arrays_per_token("model.num_layers=8", "model.remat_group_size=4")
    assert grouped <= per_layer - 1.5, (per_layer, grouped)
