"""cached_attention (the decode-step kernel) against the materialised reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops.decode import cached_attention
from jaxctx.ops.reference import reference_attention


def _inputs(b, s, h, hkv, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, s, h, d))
    k = jax.random.normal(keys[1], (b, s, hkv, d))
    v = jax.random.normal(keys[2], (b, s, hkv, d))
    return q, k, v


@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_reference_with_left_padding(h, hkv):
    """Rows with different amounts of left padding: the queries of slots [index, index + t) see what causal
    attention over the row's real tokens sees; padding queries are never read."""
    b, s, d, t, index = 3, 24, 8, 3, 13  # new tokens at slots 13..15; slots 16.. not yet written
    q, k, v = _inputs(b, s, h, hkv, d)
    pads = np.array([0, 4, 9])
    slot_valid = (np.arange(s)[None] >= pads[:, None]) & (np.arange(s)[None] < index + t)  # [B, S]
    segments = jnp.asarray(slot_valid, jnp.int32)  # padding and unwritten slots: their own segment

    def ours(q, k, v):  # the cache's slots from index on hold garbage: they must not be read
        garbage = jnp.full_like(k[:, index:], 1e3)
        k_cache = jnp.concatenate([k[:, :index], garbage], axis=1)
        v_cache = jnp.concatenate([v[:, :index], garbage], axis=1)
        new = slice(index, index + t)
        return cached_attention(q[:, new], k_cache, v_cache, k[:, new], v[:, new], jnp.int32(index),
                                jnp.asarray(slot_valid))

    def reference(q, k, v):
        return reference_attention(q, k, v, causal=True, segment_ids=segments)[:, index:index + t]

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(9), (b, t, h, d))
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, reference)]
    for g_ours, g_ref in zip(*grads):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-5)


def test_a_query_sees_its_own_key_and_valid_slots_only():
    q, k, v = _inputs(1, 8, 2, 2, 4)
    out = cached_attention(q[:, 3:4], k, v, k[:, 3:4], v[:, 3:4], jnp.int32(3), jnp.zeros((1, 8), bool))
    np.testing.assert_allclose(out, v[:, 3:4].repeat(1, axis=2), atol=1e-6)  # only itself: its own value
    empty = cached_attention(q[:, :1], k, v, k[:, :1], v[:, :1] * 0, jnp.int32(0), jnp.zeros((1, 8), bool))
    assert np.all(np.asarray(empty) == 0)


def test_shape_errors_name_the_shapes():
    q, k, v = _inputs(1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="H % Hkv"):
        cached_attention(q, k, v, k, v, jnp.int32(0), jnp.ones((1, 8), bool))
