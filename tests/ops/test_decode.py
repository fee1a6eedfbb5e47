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


def _head_major(x):  # [B, S, Hkv, D] -> [B, Hkv, S, D]
    return x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_reference_with_left_padding(h, hkv):
    """A sequence of a left-padded prompt (slots [0, P)) and generated tokens (slots P + j): the t new tokens at
    generated slots [index, index + t) see what causal attention over the row's real tokens sees."""
    b, p, n, d, t, index = 3, 12, 10, 8, 3, 4  # generated slots 0..3 cached, the new tokens are 4..6
    q, k, v = _inputs(b, p + n, h, hkv, d)
    pads = np.array([0, 4, 9])
    prompt_valid = np.arange(p)[None] >= pads[:, None]  # [B, P]
    valid = np.concatenate([prompt_valid, np.broadcast_to(np.arange(n) < index + t, (b, n))], axis=1)
    segments = jnp.asarray(valid, jnp.int32)  # padding and unwritten slots: their own segment

    def ours(q, k, v):  # the generated cache's slots from index on hold garbage: they must not be read
        gen_k = jnp.concatenate([k[:, p:p + index], jnp.full_like(k[:, p + index:], 1e3)], axis=1)
        gen_v = jnp.concatenate([v[:, p:p + index], jnp.full_like(v[:, p + index:], 1e3)], axis=1)
        new = slice(p + index, p + index + t)
        return cached_attention(q[:, new], _head_major(k[:, :p]), _head_major(v[:, :p]), jnp.asarray(prompt_valid),
                                _head_major(gen_k), _head_major(gen_v), jnp.int32(index), k[:, new], v[:, new])

    def reference(q, k, v):
        return reference_attention(q, k, v, causal=True, segment_ids=segments)[:, p + index:p + index + t]

    np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(reference)(q, k, v), atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(9), (b, t, h, d))
    # jitted: op-by-op dispatch of these many small ops costs ~10 s per case on 2 cores, one compile ~1 s
    grads = [jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)
             for f in (ours, reference)]
    for g_ours, g_ref in zip(*grads):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-5)


def test_a_query_sees_its_own_key_and_valid_slots_only():
    q, k, v = _inputs(1, 8, 2, 2, 4)
    nothing = jnp.zeros((1, 4), bool)
    hk, hv = _head_major(k[:, :4]), _head_major(v[:, :4])
    out = cached_attention(q[:, 5:6], hk, hv, nothing, hk, hv, jnp.int32(0), k[:, 5:6], v[:, 5:6])
    np.testing.assert_allclose(out, v[:, 5:6].repeat(1, axis=2), atol=1e-6)  # only itself: its own value
    # The prompt slots marked valid are seen; the generated slots from `index` on are not.
    out = cached_attention(q[:, 5:6], hk, hv, jnp.asarray([[False, True, False, False]]), hk * 0, hv * 0 + 1e3,
                           jnp.int32(0), k[:, 5:6], v[:, 5:6])
    want = reference_attention(q[:, 5:6], k[:, jnp.array([1, 5])], v[:, jnp.array([1, 5])], causal=False)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_shape_errors_name_the_shapes():
    q, k, v = _inputs(1, 8, 3, 2, 4)
    hk = _head_major(k)
    with pytest.raises(ValueError, match="H % Hkv"):
        cached_attention(q, hk, hk, jnp.ones((1, 8), bool), hk, hk, jnp.int32(0), k, v)
