"""What a decoder layer is told about the key/value cache (inputs of `CausalLM.extend`).

The cache itself (per layer: the prompt's keys and values, and preallocated buffers for the generated tokens')
belongs to the caller (`jaxctx.generate`); the model only reads it and returns the new tokens' keys and values,
which the caller writes in place with one dynamic_update_slice. Three modes, told apart by type so the choice is static:

- `None` (training, scoring): no cache; a layer returns no keys/values.
- `PrefillCache()`: the cache is empty; the prompt runs through the normal (blockwise) attention path with its
  segment ids (padding as its own segment), and each layer returns its keys/values [B, T, Hkv, Dh].
- `DecodeCache(prompt_k, prompt_v, prompt_valid, k, v, index)`: t new tokens at generated slots
  [index, index + t) attend to the prompt's keys/values, the generated ones so far and themselves
  (`jaxctx.ops.decode.cached_attention`, which only reads the cache; both parts head-major [B, Hkv, S, Dh]);
  each layer returns the new keys/values [B, t, Hkv, Dh].

For a scanned stack every DecodeCache field has a leading [L] axis (index and prompt_valid tiled L times), so the
whole tuple is scanned with the layers and each sees its own slice. An unscanned stack (what `jaxctx.generate`
runs) takes prompt_k, prompt_v, k and v as tuples of per-layer buffers and prompt_valid / index once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class PrefillCache(NamedTuple):
    """Marker: fill an empty cache from the prompt (no fields; a pytree without leaves)."""


class DecodeCache(NamedTuple):
    """Per layer (leading [L] under scan): prompt_k, prompt_v [B, Hkv, P, Dh] (read only) with prompt_valid
    [B, P] bool; k, v [B, Hkv, N, Dh], the generated tokens' keys/values (slots below index written); index []
    int32."""

    prompt_k: jax.Array
    prompt_v: jax.Array
    prompt_valid: jax.Array
    k: jax.Array
    v: jax.Array
    index: jax.Array


def layer_cache(cache, i: int):
    """Layer i's view of the cache (for an unscanned layer list); markers and None pass through.

    An unscanned model may get the key/value buffers as tuples of L arrays (one buffer per layer, read without a
    slice copy) with prompt_valid and index unstacked, or the stacked [L, ...] form the scanned stack takes.
    """
    if isinstance(cache, DecodeCache):
        if isinstance(cache.k, tuple):
            return DecodeCache(cache.prompt_k[i], cache.prompt_v[i], cache.prompt_valid, cache.k[i], cache.v[i],
                               cache.index)
        return DecodeCache(*(x[i] for x in cache))
    return cache
