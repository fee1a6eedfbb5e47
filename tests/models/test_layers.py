"""gather_rows: the embedding lookup's values and gradients equal jnp.take's, repeated and out-of-range ids too."""

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
