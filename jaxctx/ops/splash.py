"""TPU path: Pallas splash attention behind the jaxctx attention contract.

Splash works on one example at a time with a [heads, T, D] layout and unscaled logits, so this wrapper scales q,
moves heads first, vmaps over the batch and, for grouped-query attention, runs the multi-query kernel once per
key/value head (each serving its H // Hkv query heads). Causal masking is a static `CausalMask`; packed documents
use splash's native `SegmentIds`, so no T x T mask is ever built. `interpret=True` runs the same kernel in the
Pallas interpreter on any backend (how the tests check this file on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

SPLASH_BLOCK = 512  # upper bound for splash's q/kv block sizes; shrunk to T for short sequences


def _block_sizes(t: int) -> splash.BlockSizes:
    block = min(SPLASH_BLOCK, t)
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def splash_attention(q, k, v, *, causal: bool = False, segment_ids=None, interpret: bool = False):
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]. T must be a multiple of 128 (splash's tiling)."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    if t % 128:
        raise ValueError(f"attention impl='splash' needs T divisible by 128, got T={t}; use impl='blockwise'")
    head_mask = splash_mask.CausalMask((t, t)) if causal else splash_mask.FullMask((t, t))
    kernel = splash.make_splash_mqa_single_device(
        splash_mask.MultiHeadMask([head_mask] * groups), block_sizes=_block_sizes(t), interpret=interpret)
    # [B, T, H, D] -> [B, Hkv, G, T, D]: one MQA call per (example, kv head) covers its G query heads.
    qh = (q * (d ** -0.5)).reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    if segment_ids is None:
        per_head = lambda qg, kg, vg: kernel(qg, kg, vg)  # noqa: E731
        out = jax.vmap(jax.vmap(per_head))(qh, kh, vh)
    else:
        seg = segment_ids.astype(jnp.int32)
        per_head = lambda qg, kg, vg, s: kernel(qg, kg, vg, segment_ids=splash.SegmentIds(q=s, kv=s))  # noqa
        out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)  # [B, T, H, D]
