"""Attention dropout: the blockwise and ring kernels draw exactly the reference's materialised mask.

Forward and dq/dk/dv of blockwise (causal, packed segments, GQA, blocks that do not divide T) and ring (ring and
all_gather strategies on 4 fake devices, zigzag and contiguous) against `reference_attention` with the same key;
the keep rate; rate 0 is no dropout bit for bit; keys and steps change the mask; hidden-state dropout follows
natural token positions; dispatch refuses kernels without a dropout mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.errors import PlatformError
from jaxctx.ops import (attention, attention_dropout_mask, blockwise_attention, hidden_dropout,
                        reference_attention, ring_attention, to_layout, to_layout_index)


def _inputs(seed, b, t, h, hkv, d):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, t, hkv, d)),
            jax.random.normal(kv, (b, t, hkv, d)), jax.random.normal(kc, (b, t, h, d)))


def _packed(b, t):
    seg = np.zeros((b, t), np.int32)
    seg[:, : t // 3], seg[:, t // 3: t - 4], seg[:, t - 4:] = 1, 2, 0  # two documents and padding
    seg[1, : t // 2] = 3  # a different split in the second row
    return jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, ct):
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    return run(q, k, v, ct)


def _assert_close(got, want, tol=2e-5):
    np.testing.assert_allclose(got[0], want[0], atol=tol, rtol=tol, err_msg="out")
    for name, g, w in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"d{name}")


KEY = jax.random.PRNGKey(7)


@pytest.mark.parametrize("causal,packed,h,hkv,rate", [
    (True, False, 4, 2, 0.2),   # causal GQA
    (False, True, 2, 2, 0.3),   # bidirectional, packed documents with padding
    (True, True, 4, 1, 0.1),    # causal + packed, MQA
])
def test_blockwise_matches_reference_with_the_same_mask(causal, packed, h, hkv, rate):
    b, t, d = 2, 44, 8  # T not a multiple of the blocks: padded keys/queries must not disturb the mask
    q, k, v, ct = _inputs(0, b, t, h, hkv, d)
    seg = _packed(b, t) if packed else None
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg,
                                                                dropout_rate=rate, dropout_key=KEY), q, k, v, ct)
    got = _value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, causal=causal, segment_ids=seg, block_q=16,
                                                               block_k=8, dropout_rate=rate, dropout_key=KEY),
                           q, k, v, ct)
    _assert_close(got, want)
    nodrop = reference_attention(q, k, v, causal=causal, segment_ids=seg)
    assert float(jnp.max(jnp.abs(want[0] - nodrop))) > 0.1  # dropout really changed the output


@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("all_gather", "contiguous")])
def test_ring_matches_reference_with_the_same_mask(strategy, layout):
    b, t, h, hkv, d, rate = 2, 40, 4, 2, 8, 0.25
    q, k, v, ct = _inputs(1, b, t, h, hkv, d)
    seg = _packed(b, t)
    mesh = jax.make_mesh((4,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=True, segment_ids=seg,
                                                                dropout_rate=rate, dropout_key=KEY), q, k, v, ct)
    got = _value_and_grads(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True, segment_ids=seg,
                                                          strategy=strategy, layout=layout, block_q=4, block_k=4,
                                                          dropout_rate=rate, dropout_key=KEY), q, k, v, ct)
    _assert_close(got, want)


def test_keep_rate_and_independence():
    b, h, t, rate = 2, 4, 256, 0.2
    pos = jnp.arange(t)
    keep = np.asarray(attention_dropout_mask(KEY, rate, b, h, pos, pos))  # [B, H, T, T]
    n = keep.size
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) < 4 * sigma, keep.mean()
    # neighbouring keys, queries, heads and rows are uncorrelated (each agreement rate ~ r^2 + (1-r)^2)
    agree = rate ** 2 + (1 - rate) ** 2
    for a, c in ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1]),
                 (keep[1:], keep[:-1])):
        assert abs((a == c).mean() - agree) < 6 * np.sqrt(agree * (1 - agree) / a.size)
    other = np.asarray(attention_dropout_mask(jax.random.fold_in(KEY, 1), rate, b, h, pos, pos))
    assert abs((keep == other).mean() - agree) < 0.01  # another key (the next step): an independent mask


def test_rate_zero_and_no_key_are_bit_identical_to_no_dropout():
    q, k, v, _ = _inputs(2, 2, 24, 2, 2, 8)
    base = blockwise_attention(q, k, v, causal=True, block_q=8, block_k=8)
    for kw in ({"dropout_rate": 0.0, "dropout_key": KEY}, {"dropout_rate": 0.3, "dropout_key": None}):
        np.testing.assert_array_equal(blockwise_attention(q, k, v, causal=True, block_q=8, block_k=8, **kw), base)
        np.testing.assert_array_equal(attention(q, k, v, causal=True, impl="reference", **kw),
                                      reference_attention(q, k, v, causal=True))


def test_dispatch_auto_uses_blockwise_and_fused_kernels_refuse():
    q, k, v, _ = _inputs(3, 1, 16, 2, 2, 8)
    got = attention(q, k, v, causal=True, dropout_rate=0.2, dropout_key=KEY)
    want = reference_attention(q, k, v, causal=True, dropout_rate=0.2, dropout_key=KEY)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(attention(q, k, v, causal=True, impl="xla", dropout_rate=0.2, dropout_key=KEY), want,
                               atol=2e-5)
    for impl in ("cudnn", "pallas_gpu", "splash"):
        with pytest.raises(PlatformError, match=f"impl='{impl}' cannot apply attention dropout"):
            attention(q, k, v, impl=impl, dropout_rate=0.2, dropout_key=KEY)
    with pytest.raises(ValueError, match=r"dropout_rate=1.0 must be in \[0, 1\)"):
        attention(q, k, v, dropout_rate=1.0, dropout_key=KEY)


def test_hidden_dropout_follows_natural_positions():
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 32))
    y = hidden_dropout(x, KEY, 0.25)
    kept = np.asarray(y != 0)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9
    # the zigzag-permuted activations, told their natural positions, drop the same elements
    y_perm = hidden_dropout(to_layout(x, 2), KEY, 0.25, positions=to_layout_index(16, 2))
    np.testing.assert_array_equal(to_layout(y, 2), y_perm)
    assert hidden_dropout(x, KEY, 0.0) is x
    grad = jax.grad(lambda x: jnp.sum(hidden_dropout(x, KEY, 0.25)))(x)  # the backward regenerates the mask
    np.testing.assert_allclose(grad, kept / 0.75, rtol=1e-6)


def _dropout_temp_bytes(t, rate, h=8, d=64):
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)

    def loss(q, k, v, key):
        return jnp.sum(attention(q, k, v, causal=True, impl="blockwise", dropout_rate=rate, dropout_key=key))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, KEY).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_attention_dropout_adds_no_t_by_t_memory():
    """Compiled forward+backward temp memory with dropout on stays within a few block tiles of dropout off, at two
    lengths (a stored [T, T] mask would add 64 MiB per head at T=4096)."""
    for t in (2048, 4096):
        off, on = _dropout_temp_bytes(t, 0.0), _dropout_temp_bytes(t, 0.1)
        print(f"T={t}: temp {off / 2**20:.1f} MiB without dropout, {on / 2**20:.1f} MiB with")
        assert on <= off + 16 * 2**20, (t, off, on)
