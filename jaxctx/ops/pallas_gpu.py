"""GPU path for packed documents: Pallas (Triton) flash attention behind the jaxctx attention contract.

`jax.experimental.pallas.ops.gpu.attention.mha` is FlashAttention-2 (Dao, 2023) written in Pallas: an online
softmax over key blocks forward, a fused dq/dk/dv Triton backward, and `segment_ids` compared block by block
inside the kernel, so packed documents never build the dense [B, 1, T, T] mask that cuDNN's
`dot_product_attention` needs. Memory is O(T) in the sequence length.

What this wrapper adds to the kernel:
- the softmax scale (the kernel's default `sm_scale` is 1.0, not 1/sqrt(D));
- grouped-query attention by repeating each k/v head H // Hkv times: the kernel indexes k/v with the query's
  head index, so it needs equal head counts. The repeat's VJP sums dk/dv over each group, which is exactly GQA's
  gradient; the cost is H/Hkv times the k/v bytes (O(T), not O(T^2));
- any T: the kernel needs T divisible by its block sizes, so T is padded to a block multiple and the padding
  becomes a segment of its own (no real query sees a padded key, causal or not), then sliced away;
- block sizes chosen from T (small T gets small blocks so tests and short sequences do not pad to 128).
`interpret=True` runs the same Pallas kernel in the interpreter on any backend (how the tests check it on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_mha

FWD_BLOCK = 128  # forward q/k tile: FlashAttention-2's choice for D <= 128 on A100/H100
BWD_BLOCK = 64  # backward tiles: the fused dq/dk/dv kernel keeps more in registers, so smaller tiles
MIN_BLOCK = 16  # Triton's tl.dot needs every tile dimension >= 16
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def block_sizes(t: int) -> tuple[pallas_mha.BlockSizes, int]:
    """Kernel block sizes for sequence length `t`, and the padded length (a multiple of every block)."""
    fwd = min(FWD_BLOCK, max(MIN_BLOCK, _pow2_at_least(t)))  # never a tile larger than the (padded) sequence
    bwd = min(BWD_BLOCK, fwd)
    padded = -(-t // fwd) * fwd  # fwd is a multiple of bwd (powers of two), so this divides both
    # The fused backward needs q and kv cut into the same number of blocks: block_q_dq == block_kv_dkv.
    sizes = pallas_mha.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                  block_q_dq=bwd, block_kv_dq=bwd)
    return sizes, padded


def pallas_gpu_attention(q, k, v, *, causal: bool = False, segment_ids=None, interpret: bool = False):
    """q [B, T, H, D], k/v [B, T, Hkv, D], optional int segment_ids [B, T] -> [B, T, H, D] in q's dtype."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if q.dtype not in DTYPES:
        raise ValueError(f"attention impl='pallas_gpu' needs q of dtype bfloat16, float16 or float32, got "
                         f"{q.dtype}; cast q/k/v or use impl='blockwise'")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if hkv != h:
        # The kernel's k/v BlockSpecs index heads with the query head index: equal head counts only.
        k = jnp.repeat(k, h // hkv, axis=2)  # [B, T, H, D]; head j serves query heads j*G ... j*G + G - 1
        v = jnp.repeat(v, h // hkv, axis=2)
    sizes, padded = block_sizes(t)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if padded != t:
        pad = padded - t
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        # Padding is a segment of its own: one id no real token has (max + 1), so unpadded queries never see it.
        # Padded queries see only padding (their own diagonal at least), so their rows stay finite.
        if seg is None:
            seg = jnp.zeros((b, t), jnp.int32)
        pad_id = jnp.max(seg) + 1
        seg = jnp.concatenate([seg, jnp.broadcast_to(pad_id, (b, pad)).astype(jnp.int32)], axis=1)
    out = pallas_mha.mha(q, k, v, seg, sm_scale=d ** -0.5, causal=causal, block_sizes=sizes,
                         interpret=interpret)  # [B, T_padded, H, D]
    return out[:, :t].astype(q.dtype)
