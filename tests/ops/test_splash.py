"""The TPU splash wrapper, run through the Pallas interpreter on CPU against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops.reference import reference_attention

# Skip only when *jax* lacks the Pallas splash kernel; an ImportError inside our own module must fail loudly.
pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel",
                    reason="this jaxlib has no Pallas splash attention")
from jaxctx.ops import splash  # noqa: E402


@pytest.mark.slow
def test_splash_interpret_matches_reference_gqa_causal_segments():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    b, t, h, hkv, d = 1, 256, 4, 2, 128  # splash tiles T and D by 128
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, hkv, d))
    v = jax.random.normal(kv, (b, t, hkv, d))
    seg = jnp.asarray([[1] * 100 + [2] * 150 + [0] * 6], jnp.int32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    ours = lambda q, k, v: splash.splash_attention(q, k, v, causal=True, segment_ids=seg, interpret=True)  # noqa
    want = lambda q, k, v: reference_attention(q, k, v, causal=True, segment_ids=seg)  # noqa
    np.testing.assert_allclose(ours(q, k, v), want(q, k, v), atol=1e-5)
    for g, w in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(want), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_splash_rejects_unaligned_length():
    x = jnp.zeros((1, 100, 2, 128))
    with pytest.raises(ValueError, match="divisible by 128"):
        splash.splash_attention(x, x, x, interpret=True)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the error raised without a TPU")
def test_splash_impl_without_tpu_is_a_clear_error():
    from jaxctx.ops import attention
    x = jnp.zeros((1, 128, 2, 128))
    with pytest.raises(ValueError, match="needs a TPU"):
        attention(x, x, x, impl="splash")
