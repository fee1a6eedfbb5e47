"""Attention of a few new queries against a key/value cache in two parts (the decode step of generation).

The cache of a decoding batch has two parts, both head-major `[B, Hkv, S, D]`, the layout the two einsums read
without a transpose:

- the **prompt** part: the prompt's keys and values, written once by prefill and only read afterwards
  (`prompt_valid [B, P]` marks left padding invalid, so rows of different prompt lengths share one layout);
- the **generated** part `[B, Hkv, N, D]`: generated token j's key at slot j, for every row. A call's t new tokens
  belong at slots [index, index + t): query i sees the generated slots below index and the new tokens up to its
  own (the generated part is only read here; the caller writes the new keys afterwards).

Why two parts: inside the decode `while_loop` XLA:CPU copies a loop-carried buffer that is both read by a dot and
updated in place, so one `[B, S, Hkv, D]` cache cost several full copies and transposes of every layer's cache
per token. The prompt part is a loop invariant, read directly by the dot; only the small generated part is
carried. The three score blocks share one softmax (one max, one sum). Scores are [B, Hkv, G·t, S]: O(S) per new
token, which is what decoding costs anyway (prefill of a long prompt goes through the blockwise kernel instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cached_attention(q: jax.Array, prompt_k: jax.Array, prompt_v: jax.Array, prompt_valid: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, index: jax.Array, k_new: jax.Array,
                     v_new: jax.Array) -> jax.Array:
    """Causal attention of t new queries against the prompt, the generated tokens so far and themselves.

    q [B, t, H, D]; prompt_k, prompt_v [B, Hkv, P, D] with prompt_valid [B, P] (all visible to every new query
    where True); k_cache, v_cache [B, Hkv, N, D], read only: generated slots below `index` are visible (slots
    from index on are not read, so the caller writes the new keys there afterwards); k_new, v_new [B, t, Hkv, D],
    causal among themselves. Softmax in float32. H % Hkv == 0 (GQA: each k/v head serves H // Hkv query heads,
    never repeated in memory). A query with no visible key returns 0.
    """
    b, t, h, d = q.shape
    hkv, p, n = prompt_k.shape[1], prompt_k.shape[2], k_cache.shape[2]
    if (h % hkv or prompt_k.shape != (b, hkv, p, d) or prompt_v.shape != prompt_k.shape
            or prompt_valid.shape != (b, p) or k_cache.shape != (b, hkv, n, d) or v_cache.shape != k_cache.shape
            or k_new.shape != (b, t, hkv, d) or v_new.shape != k_new.shape):
        raise ValueError(f"cached_attention: q {q.shape}, prompt_k {prompt_k.shape}, prompt_v {prompt_v.shape}, "
                         f"prompt_valid {prompt_valid.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}, "
                         f"k_new {k_new.shape}, v_new {v_new.shape} do not fit (H % Hkv == 0, caches "
                         f"[B, Hkv, S, D], prompt_valid [B, P], new keys [B, t, Hkv, D])")
    groups = h // hkv
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    # [B, t, Hkv, G, D] -> [B, Hkv, G*t, D]: (batch, kv head) lead both operands, as the cache's layout has them
    qf = q.astype(jnp.float32).reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * t, d)
    new_k = k_new.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, t, D]
    new_v = v_new.astype(jnp.float32).transpose(0, 2, 1, 3)
    query_step = jnp.tile(jnp.arange(t), groups)  # [G*t]: which new token each query row is

    def scores(keys, visible):  # keys [B, Hkv, S, D], visible broadcastable to [B, 1, G*t, S]
        s = jnp.einsum("bhqd,bhsd->bhqs", qf, keys.astype(jnp.float32)) * scale  # [B, Hkv, G*t, S]
        return jnp.where(visible, s, -jnp.inf)

    blocks = [
        (scores(prompt_k, prompt_valid[:, None, None, :]), prompt_v),
        (scores(k_cache, (jnp.arange(n) < index)[None, None, None, :]), v_cache),
        (scores(new_k, (jnp.arange(t)[None, :] <= query_step[:, None])[None, None]), new_v),
    ]
    row_max = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s, _ in blocks]), axis=0)[..., None]  # [B, Hkv, G*t, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees nothing: avoid inf - inf
    denom = jnp.zeros(row_max.shape, jnp.float32)
    out = jnp.zeros((b, hkv, groups * t, d), jnp.float32)
    for s, values in blocks:
        weights = jnp.exp(s - row_max)
        denom = denom + jnp.sum(weights, axis=-1, keepdims=True)
        out = out + jnp.einsum("bhqs,bhsd->bhqd", weights, values.astype(jnp.float32))  # [B, Hkv, G*t, D]
    out = out / jnp.where(denom == 0, 1.0, denom)
    # [B, Hkv, G*t, D] -> [B, t, H, D] (head index = kv head * G + group, as the projections lay heads out)
    return out.reshape(b, hkv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
