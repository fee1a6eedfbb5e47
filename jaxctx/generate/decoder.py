"""KV-cache decoding for gpt2 and llama: prefill, one-token steps, and the greedy / sampling loop.

Layout of a batch (B rows, prompts of different lengths): prompts are left-padded to a bucket length P (a power
of two, at least 16, so a handful of shapes cover every prompt), so every row writes its t-th new token at the
same cache slot P + t. The cache is preallocated: keys and values [L, B, S, Hkv, Dh] with S = P +
max_new_tokens, plus slot_valid [B, S] (padding slots stay False) and each row's next position (positions count
real tokens only, so a padded row sees exactly what it would alone). The model runs unrolled and each layer
has its own key and value buffers, updated in place: nothing per token copies the cache.

Prefill runs the prompt through the model's normal attention path (the blockwise kernel: O(T) memory for a long
prompt), with padding as segment 0 and the prompt as segment 1; each later token attends to the cache through
`jaxctx.ops.decode.cached_attention`. The whole decode loop is one jitted `lax.while_loop` per (batch, bucket,
settings): no recompilation per token or per prompt length inside a bucket.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P

from jaxctx.generate import processors
from jaxctx.generate.settings import GenerationSettings, Knobs
from jaxctx.models.kv_cache import DecodeCache, PrefillCache
from jaxctx.parallel import BATCH_AXES

MIN_BUCKET = 16


class Cache(NamedTuple):
    """The decode state of a batch: k, v (L per-layer buffers [B, S, Hkv, Dh], each updated in place by the
    loop); slot_valid [B, S] bool; next_position [B] int32. Needs an unscanned model (`Generator` unrolls)."""

    k: jax.Array
    v: jax.Array
    slot_valid: jax.Array
    next_position: jax.Array


def bucket_length(n: int) -> int:
    """The padded prompt length for a prompt of n tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


def left_pad(prompts: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, length] int32, valid [B, length] bool): each prompt right-aligned, padding on the left."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, -len(prompt):] = prompt
            valid[row, -len(prompt):] = True
    return ids, valid


def shard_cache(x: jax.Array) -> jax.Array:
    """A cache buffer [B, S, Hkv, Dh] split as training splits activations: rows over (data, fsdp), kv heads over
    tensor where Hkv divides it. A no-op outside a `jax.set_mesh` (single-device decoding)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    shape = dict(mesh.shape)
    heads = "tensor" if x.shape[2] % shape.get("tensor", 1) == 0 else None
    rows = BATCH_AXES if x.shape[0] % (shape.get("data", 1) * shape.get("fsdp", 1)) == 0 else None
    return jax.lax.with_sharding_constraint(x, P(rows, None, heads, None))


def prefill(model, params, prompt: jax.Array, valid: jax.Array, cache_slots: int) -> tuple[jax.Array, Cache]:
    """Run the left-padded prompt [B, P] -> (next-token logits [B, V] f32, the cache with slots [0, P) filled)."""
    b, p = prompt.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]: 0 at the first token
    logits, (k, v) = model.apply({"params": params}, prompt, positions, PrefillCache(),
                                 segment_ids=valid.astype(jnp.int32), method="extend")  # k, v [L, B, P, Hkv, Dh]
    shape = (b, cache_slots) + k.shape[3:]

    def buffers(x):  # [L, B, P, Hkv, Dh] -> L buffers [B, S, Hkv, Dh] holding the prompt in slots [0, P)
        return tuple(shard_cache(jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x[i], (0, 0, 0, 0)))
                     for i in range(x.shape[0]))

    slot_valid = jnp.zeros((b, cache_slots), bool).at[:, :p].set(valid)
    return logits, Cache(buffers(k), buffers(v), slot_valid, positions[:, -1] + 1)


def decode_step(model, params, tokens: jax.Array, cache: Cache, slot: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed tokens [B] at cache slot `slot` -> (next-token logits [B, V] f32, the cache with that slot written)."""
    slot_valid = cache.slot_valid.at[:, slot].set(True)
    index = jnp.asarray(slot, jnp.int32)
    view = DecodeCache(cache.k, cache.v, index, cache.slot_valid)  # the new slot is read as a new key, not cached
    logits, (k, v) = model.apply({"params": params}, tokens[:, None], cache.next_position[:, None], view,
                                 method="extend")  # k, v [L, B, 1, Hkv, Dh]
    start = (0, index, 0, 0)

    def write(buffers, new):  # in place: each buffer is loop state that nothing else reads
        return tuple(shard_cache(jax.lax.dynamic_update_slice(x, new[i].astype(x.dtype), start))
                     for i, x in enumerate(buffers))

    return logits, Cache(write(cache.k, k), write(cache.v, v), slot_valid, cache.next_position + 1)


def end_reason(tokens: jax.Array, knobs: Knobs) -> jax.Array:
    """int32 of tokens' shape: 1 where the token is an EOS id, 2 where it is a stop id, else 0 (EOS wins)."""
    is_eos = jnp.any(tokens[..., None] == knobs.eos_ids, axis=-1)
    is_stop = jnp.any(tokens[..., None] == knobs.stop_ids, axis=-1)
    return jnp.where(is_eos, 1, jnp.where(is_stop, 2, 0)).astype(jnp.int32)


def first_end(tokens: jax.Array, knobs: Knobs) -> jax.Array:
    """[B] int32: the number of tokens through the first end token of each row (N where there is none)."""
    ends = jnp.any(tokens[:, :, None] == jnp.concatenate([knobs.eos_ids, knobs.stop_ids])[None, None], axis=2)
    return jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1) + 1, tokens.shape[1]).astype(jnp.int32)


def sample_loop(model, params, prompt: jax.Array, valid: jax.Array, settings: GenerationSettings, knobs: Knobs,
                on_token: Callable | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy or sampled decoding of a left-padded batch -> (tokens [B, N], lengths [B], reasons [B]).

    settings is the static part (`GenerationSettings.compile_key`), knobs the traced values. tokens hold the pad
    id after a row's end; reasons are 0 (length), 1 (eos), 2 (stop). on_token, if given, is called on the host
    with each step's tokens [B] (int32 numpy), in order, as they are chosen.
    """
    b, p = prompt.shape
    n = settings.max_new_tokens
    logits, cache = prefill(model, params, prompt, valid, p + n)
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], prompt].max(valid)
    rng = jax.random.key(knobs.seed)

    def pick(step, logits, seen, done):
        scores = processors.process(logits, seen, settings, knobs)
        token = processors.choose(scores, jax.random.fold_in(rng, step), settings)
        token = jnp.where(done, knobs.pad_id, token)
        if on_token is not None:
            io_callback(on_token, None, token, ordered=True)
        return token

    def body(state):
        step, logits, cache, seen, done, out = state
        token = pick(step, logits, seen, done)
        out = out.at[:, step].set(token)
        if seen is not None:
            seen = processors.mark_seen(seen, token)
        logits, cache = decode_step(model, params, token, cache, p + step)
        return step + 1, logits, cache, seen, done | (end_reason(token, knobs) > 0), out

    def cond(state):
        step, done = state[0], state[4]
        return (step < n - 1) & ~jnp.all(done)  # the last token needs no forward pass after it

    out = jnp.full((b, n), knobs.pad_id, jnp.int32)
    state = (jnp.int32(0), logits, cache, seen, jnp.zeros((b,), bool), out)
    step, logits, cache, seen, done, out = jax.lax.while_loop(cond, body, state)
    out = out.at[:, step].set(pick(step, logits, seen, done))  # all pad when every row has ended already
    lengths = first_end(out, knobs)
    last = jnp.take_along_axis(out, lengths[:, None] - 1, axis=1)[:, 0]
    return out, lengths, end_reason(last, knobs)
