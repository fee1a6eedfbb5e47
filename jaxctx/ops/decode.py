"""Attention of a few new queries against a preallocated key/value cache (the decode step of generation).

The cache has S slots; a call's t new tokens belong at slots [index, index + t), so query i sits at slot index + i
and sees every valid slot before index and the new tokens up to its own (the cache is only read: the caller
writes the new keys afterwards, in place). Slot validity is per row ([B, S]): left-padded
prompts mark their padding slots invalid, so rows of different prompt lengths share one slot index. The scores
are [B, H, t, S]: O(S) per new token, which is what decoding costs anyway (prefill of a long prompt goes through
the blockwise kernel instead, see `jaxctx.generate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     index: jax.Array, slot_valid: jax.Array) -> jax.Array:
    """Causal attention of t new queries against the cache and their own keys, softmax in float32.

    q [B, t, H, D] (the queries of slots index .. index+t-1); k_cache, v_cache [B, S, Hkv, D], read only: slots
    below `index` where slot_valid [B, S] is True are visible (slots from index on are not read, so the caller
    writes the new keys there afterwards); k_new, v_new [B, t, Hkv, D], causal among themselves. The two score
    blocks share one softmax (one max, one sum), so the cache is never copied to make room for the new keys.
    H % Hkv == 0 (GQA: each k/v head serves H // Hkv query heads, never repeated in memory). A query with no
    visible key returns 0.
    """
    b, t, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    if (h % hkv or k_cache.shape != v_cache.shape or slot_valid.shape != (b, s)
            or k_new.shape != (b, t, hkv, d) or v_new.shape != k_new.shape):
        raise ValueError(f"cached_attention: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}, "
                         f"k_new {k_new.shape}, slot_valid {slot_valid.shape} do not fit (H % Hkv == 0, "
                         f"slot_valid [B, S], k_new [B, t, Hkv, D])")
    groups = h // hkv
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    qf = q.astype(jnp.float32).reshape(b, t, hkv, groups, d)  # [B, t, Hkv, G, D]
    old = jnp.einsum("bqhgd,bshd->bhgqs", qf, k_cache.astype(jnp.float32)) * scale  # [B, Hkv, G, t, S]
    new = jnp.einsum("bqhgd,bshd->bhgqs", qf, k_new.astype(jnp.float32)) * scale  # [B, Hkv, G, t, t]
    old_visible = (jnp.arange(s)[None, :] < index) & slot_valid  # [B, S]
    new_visible = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [t, t]
    old = jnp.where(old_visible[:, None, None, None, :], old, -jnp.inf)
    new = jnp.where(new_visible, new, -jnp.inf)
    row_max = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), jnp.max(new, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees nothing: avoid inf - inf
    p_old, p_new = jnp.exp(old - row_max), jnp.exp(new - row_max)
    denom = jnp.sum(p_old, axis=-1) + jnp.sum(p_new, axis=-1)  # [B, Hkv, G, t]
    out = (jnp.einsum("bhgqs,bshd->bqhgd", p_old, v_cache.astype(jnp.float32))
           + jnp.einsum("bhgqs,bshd->bqhgd", p_new, v_new.astype(jnp.float32)))  # [B, t, Hkv, G, D]
    denom = jnp.transpose(denom, (0, 3, 1, 2))[..., None]  # [B, t, Hkv, G, 1]
    out = out / jnp.where(denom == 0, 1.0, denom)
    return out.reshape(b, t, h, d).astype(q.dtype)
