"""Shared layers: the embedding lookup (values and gradients equal jnp.take's, repeated and out-of-range ids too)
and grouped remat of the layer stack (exactly the same loss and gradients as per-layer remat)."""

import dataclasses

import flax.linen as nn
import pytest

from jaxctx import config as config_lib
from jaxctx.models import build

import jax
import jax.numpy as jnp
import numpy as np

from jaxctx.models.layers import gather_rows


def test_gather_rows_matches_take_in_value_and_gradient():
    table = jax.random.normal(jax.random.key(0), (10, 4))
    ids = jnp.array([[0, 3, 3, 9], [9, 9, 1, 0]])  # repeated ids: their cotangents must add up
    cot = jax.random.normal(jax.random.key(1), (2, 4, 4))

    def loss(fn, table):
        return jnp.sum(fn(table, ids) * cot)

    np.testing.assert_array_equal(gather_rows(table, ids), jnp.take(table, ids, axis=0))
    ours = jax.jit(jax.grad(lambda t: loss(gather_rows, t)))(table)
    ref = jax.jit(jax.grad(lambda t: loss(lambda t, i: jnp.take(t, i, axis=0), t)))(table)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert not np.asarray(ours)[[2, 4, 5, 6, 7, 8]].any()  # rows nobody looked up get no gradient


def test_gather_rows_out_of_range_ids_get_no_gradient():
    table = jnp.ones((5, 2))
    ids = jnp.array([[1, 7]])  # 7 is out of range: NaN row (jnp.take's fill), dropped in the backward
    rows = gather_rows(table, ids)
    assert np.isnan(np.asarray(rows[0, 1])).all()
    grad = jax.grad(lambda t: jnp.sum(jnp.nan_to_num(gather_rows(t, ids))))(table)
    np.testing.assert_array_equal(grad, jnp.zeros((5, 2)).at[1].set(1.0))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_remat_groups_give_the_same_loss_and_gradients(family):
    cfg = config_lib.load("configs/tiny.yaml", [f"model.family={family}", "model.num_layers=4",
                                                "model.remat_policy=full"]).model
    per_layer, grouped = build(cfg), build(dataclasses.replace(cfg, remat_group_size=2))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    params = nn.unbox(per_layer.init(jax.random.key(1), ids)["params"])
    grouped_params = nn.unbox(grouped.init(jax.random.key(1), ids)["params"])
    # the param tree does not change with grouping: stacked [L, ...] leaves, same names, same init
    jax.tree.map(np.testing.assert_array_equal, grouped_params, params)

    def loss(model, p):
        return jnp.sum(jnp.sin(model.apply({"params": p}, ids)))

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(per_layer, p)))(params)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(grouped, p)))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_grads, ref_grads)
