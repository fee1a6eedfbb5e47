"""Logits processing and token choice for one decode step, in the order transformers applies them.

repetition penalty -> (sampling only) temperature -> top-k -> top-p -> argmax or a draw. Everything works on
[B, V] float32 scores; filtered tokens get -inf. Which processors run is static (GenerationSettings.compile_key);
their values are traced (Knobs), so a new seed, temperature or top_p reuses the compiled loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxctx.generate.settings import GenerationSettings, Knobs


def apply_repetition_penalty(scores: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """scores [B, V]; seen [B, V] bool (the token occurs in the row): positive scores / penalty, negative * it."""
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalised, scores)


def top_k_filter(scores: jax.Array, k) -> jax.Array:
    """Keep the k highest scores per row (ties with the k-th are kept, as transformers does); k may be traced."""
    vocab = scores.shape[-1]
    k = jnp.clip(k, 1, vocab)
    kth = jnp.sort(scores, axis=-1)[:, vocab - k][:, None]  # [B, 1]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: jax.Array, p) -> jax.Array:
    """Nucleus filter: drop the lowest-probability tokens whose cumulative probability is <= 1 - p (the most
    likely token always stays); p may be traced."""
    order = jnp.argsort(scores, axis=-1)  # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def process(scores: jax.Array, seen: jax.Array | None, settings: GenerationSettings, knobs: Knobs) -> jax.Array:
    """The processors that settings turns on, with knobs' values, on scores [B, V] (logits, or log-probabilities
    for beam search)."""
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, knobs.repetition_penalty)
    if settings.do_sample:
        scores = scores / knobs.temperature
        if settings.top_k > 0:
            scores = top_k_filter(scores, knobs.top_k)
        if settings.top_p < 1:
            scores = top_p_filter(scores, knobs.top_p)
    return scores


def choose(scores: jax.Array, rng: jax.Array, settings: GenerationSettings) -> jax.Array:
    """Next token [B] int32 from processed scores: argmax, or one draw from softmax(scores) per row."""
    if settings.do_sample:
        return jax.random.categorical(rng, scores, axis=-1).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """seen [B, V] bool with tokens [B] set."""
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
