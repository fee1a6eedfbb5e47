"""The Pallas GPU (Triton) attention wrapper, run through the Pallas interpreter on CPU against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops.reference import reference_attention

# Skip only when *jax* lacks the Pallas GPU attention kernel; an ImportError inside our own module must fail.
pytest.importorskip("jax.experimental.pallas.ops.gpu.attention", reason="this jax has no Pallas GPU attention")
from jaxctx.ops import pallas_gpu  # noqa: E402


def _inputs(b, t, h, hkv, d, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, t, hkv, d), dtype)
    v = jax.random.normal(kv, (b, t, hkv, d), dtype)
    d_out = jax.random.normal(kd, (b, t, h, d), jnp.float32)  # a fixed cotangent: sum(out * d_out) as loss
    return q, k, v, d_out


def _check(q, k, v, d_out, *, causal, seg, atol, grad_atol):
    def ours(q, k, v):
        return pallas_gpu.pallas_gpu_attention(q, k, v, causal=causal, segment_ids=seg, interpret=True)

    def want(q, k, v):
        return reference_attention(q, k, v, causal=causal, segment_ids=seg)

    out = ours(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want(q, k, v), np.float32), atol=atol)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out)

    got = jax.grad(loss(ours), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(want), (0, 1, 2))(q, k, v)
    for name, g, w, x in zip("qkv", got, ref, (q, k, v)):
        assert g.shape == x.shape, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=grad_atol,
                                   err_msg=f"d{name}")


@pytest.mark.slow
def test_interpret_causal_packed_gqa_padded_matches_reference():
    # T=40 is not a block multiple: padded to 64, padding its own segment. Three documents, GQA 4 over 2 heads.
    b, t, h, hkv, d = 2, 40, 4, 2, 16
    q, k, v, d_out = _inputs(b, t, h, hkv, d)
    seg = jnp.asarray([[1] * 13 + [2] * 20 + [3] * 7, [5] * 40], jnp.int32)
    _check(q, k, v, d_out, causal=True, seg=seg, atol=1e-5, grad_atol=1e-4)


@pytest.mark.slow
def test_interpret_bidirectional_unsegmented_padded_matches_reference():
    # No segment_ids, non-causal, T=20 padded to 32: the wrapper's own padding segment must hide padded keys.
    q, k, v, d_out = _inputs(1, 20, 2, 2, 16, seed=1)
    _check(q, k, v, d_out, causal=False, seg=None, atol=1e-5, grad_atol=1e-4)


@pytest.mark.slow
def test_interpret_bf16_packed_within_bf16_tolerance():
    q, k, v, d_out = _inputs(1, 32, 2, 1, 16, dtype=jnp.bfloat16, seed=2)
    seg = jnp.asarray([[0] * 12 + [1] * 20], jnp.int32)
    _check(q, k, v, d_out, causal=True, seg=seg, atol=3e-2, grad_atol=1e-1)


def test_block_sizes_fit_t_and_pad_to_a_multiple():
    for t, (fwd, bwd, padded) in {20: (32, 32, 32), 40: (64, 64, 64), 128: (128, 64, 128),
                                  300: (128, 64, 384), 4096: (128, 64, 4096), 3: (16, 16, 16)}.items():
        sizes, got_padded = pallas_gpu.block_sizes(t)
        assert (sizes.block_q, sizes.block_k, sizes.block_q_dq, sizes.block_kv_dkv, got_padded) == (
            fwd, fwd, bwd, bwd, padded), t
        assert got_padded % sizes.block_q == 0 and got_padded % sizes.block_q_dkv == 0


def test_no_t_by_t_array_in_forward_or_backward():
    # O(T) memory: trace (not run) the GPU program's forward+backward; no intermediate may hold T*T elements,
    # which the dense mask cuDNN gets for packed batches ([B, 1, T, T]) would.
    b, t, h, d = 1, 1024, 2, 64
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, 1, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        out = pallas_gpu.pallas_gpu_attention(q, k, v, causal=True, segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, kv, kv, seg)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
            for param in eqn.params.values():  # custom_vjp, pjit, pallas_call bodies
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert sizes and max(sizes) < t * t, max(sizes)


def test_unsupported_dtype_is_a_value_error_naming_impl():
    x = jnp.zeros((1, 16, 1, 16), jnp.int8)
    with pytest.raises(ValueError, match="impl='pallas_gpu' needs q of dtype"):
        pallas_gpu.pallas_gpu_attention(x, x, x, interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised without a GPU")
def test_pallas_gpu_impl_without_gpu_is_a_clear_error():
    from jaxctx.ops import attention
    x = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(ValueError, match="impl='pallas_gpu' needs a GPU"):
        attention(x, x, x, impl="pallas_gpu")


def test_auto_on_gpu_picks_pallas_gpu_for_segments_only(monkeypatch):
    import importlib
    attention_mod = importlib.import_module("jaxctx.ops.attention")  # the module, not the function it exports
    monkeypatch.setattr(attention_mod.jax, "default_backend", lambda: "gpu")
    assert attention_mod.resolve_impl("auto", jnp.bfloat16, segmented=True) == "pallas_gpu"
    assert attention_mod.resolve_impl("auto", jnp.float32, segmented=True) == "pallas_gpu"
    assert attention_mod.resolve_impl("auto", jnp.bfloat16) == "cudnn"
    assert attention_mod.resolve_impl("auto", jnp.float32) == "blockwise"
    assert attention_mod.resolve_impl("cudnn", jnp.bfloat16, segmented=True) == "cudnn"  # explicit wins


def test_platform_and_config_know_pallas_gpu():
    from jaxctx.config import ATTENTION_IMPLS
    from jaxctx.ops import IMPLS
    from jaxctx.platform import _KERNEL_NEEDS
    assert "pallas_gpu" in ATTENTION_IMPLS and "pallas_gpu" in IMPLS
    assert _KERNEL_NEEDS["pallas_gpu"][0] == "gpu"
