"""Attention of a few new queries against a preallocated key/value cache (the decode step of generation).

The cache has S slots; a call writes its t new keys at slots [index, index + t) before attending, so query i sits
at slot index + i and sees every valid slot up to its own. Slot validity is per row ([B, S]): left-padded
prompts mark their padding slots invalid, so rows of different prompt lengths share one slot index. The scores
are [B, H, t, S]: O(S) per new token, which is what decoding costs anyway (prefill of a long prompt goes through
the blockwise kernel instead, see `jaxctx.generate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, index: jax.Array,
                     slot_valid: jax.Array) -> jax.Array:
    """Causal attention of q against the cache, softmax in float32.

    q [B, t, H, D] (the queries of slots index .. index+t-1); k_cache, v_cache [B, S, Hkv, D] with the t new
    keys already written; index: int scalar (first new slot); slot_valid [B, S] bool. H % Hkv == 0 (GQA: each
    k/v head serves H // Hkv query heads, never repeated in memory). A query with no visible slot returns 0.
    """
    b, t, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    if h % hkv or k_cache.shape != v_cache.shape or slot_valid.shape != (b, s):
        raise ValueError(f"cached_attention: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}, "
                         f"slot_valid {slot_valid.shape} do not fit (H % Hkv == 0, slot_valid [B, S])")
    groups = h // hkv
    qf = q.astype(jnp.float32).reshape(b, t, hkv, groups, d)  # [B, t, Hkv, G, D]
    scores = jnp.einsum("bqhgd,bshd->bhgqs", qf, k_cache.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    query_slot = index + jnp.arange(t)  # [t]
    visible = (jnp.arange(s)[None, :] <= query_slot[:, None])[None] & slot_valid[:, None, :]  # [B, t, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)  # [B, Hkv, G, t, S]
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees nothing: avoid inf - inf
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqs,bshd->bqhgd", probs, v_cache.astype(jnp.float32))  # [B, t, Hkv, G, D]
    return out.reshape(b, t, h, d).astype(q.dtype)
