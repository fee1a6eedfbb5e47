"""LayerNorm / RMSNorm with hand-written VJPs against the plain jnp references: values and all gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(keys[0], (2, 7, 16)) * 3 + 1).astype(dtype)  # off-centre, not unit variance
    scale = 1 + 0.1 * jax.random.normal(keys[1], (16,))
    bias = 0.1 * jax.random.normal(keys[2], (16,))
    cot = jax.random.normal(keys[3], (2, 7, 16))
    return x, scale, bias, cot


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_matches_reference_in_value_and_gradients(kind, dtype, tol):
    x, scale, bias, cot = _inputs(dtype)
    if kind == "layer":
        ours = lambda x, s, b: layer_norm(x, s, b, eps=1e-5, out_dtype=jnp.float32)  # noqa: E731
        ref = lambda x, s, b: layer_norm_reference(x, s, b, 1e-5, jnp.float32)  # noqa: E731
    else:
        ours = lambda x, s, b: rms_norm(x, s, eps=1e-6, out_dtype=jnp.float32)  # noqa: E731
        ref = lambda x, s, b: rms_norm_reference(x, s, 1e-6, jnp.float32)  # noqa: E731

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cot)

    np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), rtol=tol, atol=tol)
    argnums = (0, 1, 2) if kind == "layer" else (0, 1)
    got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=argnums))(x, scale, bias)
    want = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=argnums))(x, scale, bias)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_output_dtype_and_constant_rows():
    x = jnp.ones((3, 8), jnp.bfloat16)  # zero variance: normalised to 0, finite gradients
    y = layer_norm(x, jnp.ones(8), jnp.zeros(8), eps=1e-5, out_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and not np.asarray(y, np.float32).any()
    dx = jax.grad(lambda x: jnp.sum(layer_norm(x, jnp.ones(8), jnp.zeros(8), eps=1e-5) * jnp.arange(8.0)))(
        x.astype(jnp.float32))
    assert np.isfinite(np.asarray(dx)).all()
