"""KV-cache decoding for gpt2 and llama: prefill, one-token steps, and the greedy / sampling loop.

Layout of a batch (B rows, prompts of different lengths): prompts are left-padded to a bucket length P (a power
of two, at least 16, so a handful of shapes cover every prompt). The cache has two parts per layer, both
head-major [B, Hkv, S, Dh] (the layout the decode einsums read without a transpose):

- the prompt's keys and values [B, Hkv, P, Dh] with `prompt_valid` [B, P] (padding slots False), written once by
  prefill and then only read: the decode loop closes over them, so they are loop invariants;
- the generated tokens' keys and values [B, Hkv, N, Dh] (N = max_new_tokens): every row writes its t-th new token
  at slot t, in place. Only this small part is loop state.

Each row also carries its next position (positions count real tokens only, so a padded row sees exactly what it
would alone). Why two parts: XLA:CPU copies a loop-carried buffer that a dot reads and a dynamic_update_slice
writes; with one [B, S, Hkv, Dh] cache that was a few full copies and transposes of every layer's cache per
token (measured: 4x slower decoding at a 4096-token prompt).

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


class PromptCache(NamedTuple):
    """The prompt's part of the cache: k, v (L per-layer buffers [B, Hkv, P, Dh], read only); valid [B, P] bool."""

    k: tuple
    v: tuple
    valid: jax.Array


class Cache(NamedTuple):
    """The decode state of a batch: prompt (a PromptCache; None inside the loop state, which closes over it);
    k, v (L per-layer buffers [B, Hkv, N, Dh] of the generated tokens, each updated in place by the loop);
    next_position [B] int32. Needs an unscanned model (`Generator` unrolls)."""

    prompt: PromptCache | None
    k: tuple
    v: tuple
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
    """A cache buffer [B, Hkv, S, Dh] split as training splits activations: rows over (data, fsdp), kv heads over
    tensor where Hkv divides it. A no-op outside a `jax.set_mesh` (single-device decoding)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    shape = dict(mesh.shape)
    heads = "tensor" if x.shape[1] % shape.get("tensor", 1) == 0 else None
    rows = BATCH_AXES if x.shape[0] % (shape.get("data", 1) * shape.get("fsdp", 1)) == 0 else None
    return jax.lax.with_sharding_constraint(x, P(rows, heads, None, None))


def prefill(model, params, prompt: jax.Array, valid: jax.Array, new_tokens: int) -> tuple[jax.Array, Cache]:
    """Run the left-padded prompt [B, P] -> (next-token logits [B, V] f32, the cache: the prompt's part filled,
    room for `new_tokens` generated tokens)."""
    b = prompt.shape[0]
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]: 0 at the first token
    logits, (k, v) = model.apply({"params": params}, prompt, positions, PrefillCache(),
                                 segment_ids=valid.astype(jnp.int32), method="extend")  # k, v [L, B, P, Hkv, Dh]
    shape = (b, k.shape[3], new_tokens, k.shape[4])  # [B, Hkv, N, Dh]

    def head_major(x):  # [L, B, P, Hkv, Dh] -> L buffers [B, Hkv, P, Dh]
        return tuple(shard_cache(x[i].transpose(0, 2, 1, 3)) for i in range(x.shape[0]))

    def empty(x):  # L zero buffers [B, Hkv, N, Dh] for the generated tokens
        return tuple(shard_cache(jnp.zeros(shape, x.dtype)) for _ in range(x.shape[0]))

    return logits, Cache(PromptCache(head_major(k), head_major(v), valid), empty(k), empty(v), positions[:, -1] + 1)


def decode_step(model, params, tokens: jax.Array, cache: Cache, index: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed tokens [B] as generated token `index` (every row's slot) -> (next-token logits [B, V] f32, the cache
    with that slot written)."""
    index = jnp.asarray(index, jnp.int32)
    prompt = cache.prompt
    view = DecodeCache(prompt.k, prompt.v, prompt.valid, cache.k, cache.v, index)  # the new slot: read as new
    logits, (k, v) = model.apply({"params": params}, tokens[:, None], cache.next_position[:, None], view,
                                 method="extend")  # k, v [L, B, 1, Hkv, Dh]
    start = (0, 0, index, 0)

    def write(buffers, new):  # in place: each buffer is loop state that nothing else reads
        return tuple(shard_cache(jax.lax.dynamic_update_slice(x, new[i].transpose(0, 2, 1, 3).astype(x.dtype), start))
                     for i, x in enumerate(buffers))

    return logits, Cache(prompt, write(cache.k, k), write(cache.v, v), cache.next_position + 1)


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
    b = prompt.shape[0]
    n = settings.max_new_tokens
    logits, cache = prefill(model, params, prompt, valid, n)
    prompt_cache = cache.prompt  # a loop invariant: the body closes over it instead of carrying it
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
        logits, cache = decode_step(model, params, token, cache._replace(prompt=prompt_cache), step)
        return step + 1, logits, cache._replace(prompt=None), seen, done | (end_reason(token, knobs) > 0), out

    def cond(state):
        step, done = state[0], state[4]
        return (step < n - 1) & ~jnp.all(done)  # the last token needs no forward pass after it

    out = jnp.full((b, n), knobs.pad_id, jnp.int32)
    state = (jnp.int32(0), logits, cache._replace(prompt=None), seen, jnp.zeros((b,), bool), out)
    step, logits, cache, seen, done, out = jax.lax.while_loop(cond, body, state)
    out = out.at[:, step].set(pick(step, logits, seen, done))  # all pad when every row has ended already
    lengths = first_end(out, knobs)
    last = jnp.take_along_axis(out, lengths[:, None] - 1, axis=1)[:, 0]
    return out, lengths, end_reason(last, knobs)
