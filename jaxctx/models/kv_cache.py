"""What a decoder layer is told about the key/value cache (inputs of `CausalLM.extend`).

The cache itself ([L, B, S, Hkv, Dh] keys and values, preallocated) belongs to the caller (`jaxctx.generate`);
the model only reads it and returns the new tokens' keys and values, which the caller writes in place with one
dynamic_update_slice. Three modes, told apart by type so the choice is static:

- `None` (training, scoring): no cache; a layer returns no keys/values.
- `PrefillCache()`: the cache is empty; the prompt runs through the normal (blockwise) attention path with its
  segment ids (padding as its own segment), and each layer returns its keys/values [B, T, Hkv, Dh].
- `DecodeCache(k, v, index, slot_valid)`: t new tokens at slots [index, index + t) attend to the cache
  (`jaxctx.ops.decode.cached_attention`, which only reads it); each layer returns the new keys/values
  [B, t, Hkv, Dh].

For a scanned stack every DecodeCache field has a leading [L] axis (index and slot_valid tiled L times), so the
whole tuple is scanned with the layers and each sees its own slice. An unscanned stack (what `jaxctx.generate`
runs) takes k and v as tuples of per-layer [B, S, Hkv, Dh] buffers and index / slot_valid once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class PrefillCache(NamedTuple):
    """Marker: fill an empty cache from the prompt (no fields; a pytree without leaves)."""


class DecodeCache(NamedTuple):
    """Per layer (leading [L] under scan): k, v [B, S, Hkv, Dh]; index [] int32; slot_valid [B, S] bool."""

    k: jax.Array
    v: jax.Array
    index: jax.Array
    slot_valid: jax.Array


def layer_cache(cache, i: int):
    """Layer i's view of the cache (for an unscanned layer list); markers and None pass through.

    An unscanned model may get k and v as tuples of L arrays (one buffer per layer, read without a slice copy)
    with index and slot_valid unstacked, or the stacked [L, ...] form the scanned stack takes.
    """
    if isinstance(cache, DecodeCache):
        if isinstance(cache.k, tuple):
            return DecodeCache(cache.k[i], cache.v[i], cache.index, cache.slot_valid)
        return DecodeCache(*(x[i] for x in cache))
    return cache
