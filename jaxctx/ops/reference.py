"""Materialised attention: the oracle every other kernel is tested against.

Builds the full [B, H, T, T] score matrix, so memory is O(T^2). Use it for tests and short sequences only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxctx.ops.dropout import attention_dropout_mask


def visibility_mask(t_q: int, t_k: int, *, causal: bool, segment_ids: jax.Array | None) -> jax.Array | None:
    """Boolean [B or 1, 1, T, T] mask: True where a query may attend to a key; None when everything is visible."""
    mask = None
    if causal:
        mask = (jnp.arange(t_q)[:, None] >= jnp.arange(t_k)[None, :])[None, None]  # [1, 1, T, T]
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
        mask = same if mask is None else mask & same
    return mask


def reference_attention(q, k, v, *, causal: bool = False, segment_ids=None, dropout_rate: float = 0.0,
                        dropout_key=None):
    """Softmax attention computed in float32 with the score matrix materialised.

    q [B, T, H, D]; k, v [B, T, Hkv, D] with H % Hkv == 0 (grouped-query attention shares each k/v head
    across H // Hkv query heads). A query with no visible key returns zeros. dropout_rate > 0 with a dropout_key:
    the probabilities are multiplied by the materialised `attention_dropout_mask` / (1 - rate), the same mask
    the blockwise and ring kernels regenerate block by block.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    qf = q.astype(jnp.float32).reshape(b, t, hkv, groups, d)  # [B, T, Hkv, G, D]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf) / jnp.sqrt(jnp.float32(d))  # [B, Hkv, G, T, T]
    mask = visibility_mask(t, t, causal=causal, segment_ids=segment_ids)
    if mask is not None:
        mask = mask[:, :, None]  # [B, 1, 1, T, T]
        scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows with no visible key: avoid inf - inf
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0, 1.0, denom)
    if dropout_rate > 0.0 and dropout_key is not None:
        positions = jnp.arange(t)
        keep = attention_dropout_mask(dropout_key, dropout_rate, b, h, positions, positions)  # [B, H, T, T]
        keep = keep.reshape(b, hkv, groups, t, t)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, vf)  # [B, T, Hkv, G, D]
    return out.reshape(b, t, h, d).astype(q.dtype)
