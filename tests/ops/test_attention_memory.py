"""Compiled memory of attention forward+backward, from XLA's memory analysis (deterministic, no timing).

Blockwise must be O(T): measured at 8K, 16K and 32K its temp memory is affine in T (the 16K -> 32K step is twice
the 8K -> 16K step; a T^2 term would make it four times), at two full-length [T, H, D] f32 arrays per token
(measured 2.03; the bound, 2.5, fails if the kernel keeps one more full-length copy, e.g. of q or dO in the
layout its block matmuls read), while the materialised reference grows ~16x from 2K to 8K. This is what catches
a backward that silently stores every block (plain autodiff through the blockwise forward), which would grow
quadratically.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxctx.ops import attention


def _fwd_bwd_temp_bytes(impl, t, *, causal=True, b=1, h=8, d=64):
    spec = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, segment_ids):
        return jnp.sum(attention(q, k, v, causal=causal, segment_ids=segment_ids, impl=impl))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_memory_grows_linearly(causal):
    h, d = 8, 64
    m8, m16, m32 = (_fwd_bwd_temp_bytes("blockwise", t, causal=causal, h=h, d=d) for t in (8192, 16384, 32768))
    assert m8 < m16 < m32, (m8, m16, m32)
    assert 1.9 <= (m32 - m16) / (m16 - m8) <= 2.1, (m8, m16, m32)  # affine in T: equal bytes per extra token
    arrays_per_token = (m32 - m16) / 16384 / (h * d * 4)  # in full-length [T, H, D] f32 arrays
    assert arrays_per_token <= 2.5, arrays_per_token  # measured 2.03


def test_reference_memory_grows_quadratically():
    small = _fwd_bwd_temp_bytes("reference", 2048)
    large = _fwd_bwd_temp_bytes("reference", 8192)
    assert large >= 12 * small, (small, large)


def test_blockwise_long_context_fits_512_mib():
    """T=32768, B=1, H=8, D=64, f32 causal forward+backward: at most 512 MiB of compiled temp memory."""
    assert _fwd_bwd_temp_bytes("blockwise", 32768) <= 512 * 2**20



def test_segment_ids_add_no_full_length_buffer():
    """Packed documents reuse the same buffers: the segment-range switch must not make XLA copy the full-length
    dQ accumulator (it did when dQ went through lax.switch: +1 [B, T, H, D] f32 array)."""
    t, h, d = 16384, 8, 64
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def temp_bytes(*segment_ids):
        def loss(q, k, v, *segs):
            return jnp.sum(attention(q, k, v, causal=True, segment_ids=segs[0] if segs else None, impl="blockwise"))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, *segment_ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, packed = temp_bytes(), temp_bytes(seg)
    assert packed - plain < 0.5 * t * h * d * 4, (plain, packed)
