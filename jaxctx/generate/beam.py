"""Beam search with a KV cache, the algorithm of transformers' vectorised `_beam_search` (v4.50+), in one jitted
while loop.

Per step, with K = num_beams and M = max(2, 1 + #end ids) * K candidates per prompt:
1. log_softmax of each beam's logits, processed (repetition penalty), plus the beam's running score -> [B, K*V];
   the top M continuations.
2. Candidates ending in an end id, or reaching max_new_tokens, are finished. The best K unfinished ones are the
   next running beams (their rows of the generated-token cache are gathered every step; the prompt's cache is
   the same for every beam of a prompt, so it is never reordered).
3. Finished candidates among the top K enter the finished set with score sum_logprob / length ** length_penalty
   (length = new tokens including the end token) and the best K of old and new finished hypotheses are kept.
4. Stop when every running beam hits a stop, when early_stopping=True and K hypotheses are finished, or when the
   best running beam can no longer beat the worst finished one (transformers' heuristic, which with
   early_stopping="never" and length_penalty > 0 assumes the maximal length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxctx.generate import processors
from jaxctx.generate.decoder import Cache, PromptCache, decode_step, end_reason, prefill, shard_cache
from jaxctx.generate.settings import GenerationSettings, Knobs

NEG = -1.0e9  # transformers' "impossible" score; a finite value keeps sums and comparisons well defined


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, K, ...] at beam indices index [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_loop(model, params, prompt: jax.Array, valid: jax.Array, settings: GenerationSettings,
              knobs: Knobs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Beam search of a left-padded batch -> (best hypothesis tokens [B, N], lengths [B], reasons [B]).

    settings is the static part (`GenerationSettings.compile_key`), knobs the traced values."""
    b = prompt.shape[0]
    k_beams, n = settings.num_beams, settings.max_new_tokens
    m = max(2, 1 + len(settings.end_ids)) * k_beams
    logits, cache = prefill(model, params, prompt, valid, n)
    vocab = logits.shape[-1]

    def repeat(buffers):  # every beam starts from the prompt: rows repeated K times ([B*K, ...], beam-major)
        return tuple(shard_cache(jnp.repeat(x, k_beams, axis=0)) for x in buffers)

    # The prompt's part is a loop invariant (the body closes over it); only the generated part is loop state.
    prompt_cache = PromptCache(repeat(cache.prompt.k), repeat(cache.prompt.v),
                               jnp.repeat(cache.prompt.valid, k_beams, axis=0))
    cache = Cache(None, repeat(cache.k), repeat(cache.v), jnp.repeat(cache.next_position, k_beams, axis=0))
    logits = jnp.repeat(logits, k_beams, axis=0)  # [B*K, V]
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt].max(valid)
        seen = jnp.repeat(seen, k_beams, axis=0)
    top_k_mask = jnp.arange(m) < k_beams  # [M]: only these may become finished hypotheses
    max_length_penalty = float(n) ** settings.length_penalty

    def body(state):
        (step, logits, cache, seen, run_seq, run_score, fin_seq, fin_score, fin_len, finished, unsatisfied,
         _) = state
        scores = processors.process(jax.nn.log_softmax(logits, axis=-1), seen, settings, knobs)  # [B*K, V]
        scores = scores.reshape(b, k_beams, vocab) + run_score[:, :, None]
        top_score, top_index = jax.lax.top_k(scores.reshape(b, k_beams * vocab), m)  # [B, M]
        source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        cand_seq = _gather(run_seq, source_beam).at[:, :, step].set(token)  # [B, M, N]
        hits = (end_reason(token, knobs) > 0) | (step == n - 1)  # [B, M]

        # The next running beams: the best K candidates that did not finish.
        running_score = top_score + hits * NEG
        next_score, next_index = jax.lax.top_k(running_score, k_beams)  # [B, K]
        next_seq = _gather(cand_seq, next_index)
        parent = _gather(source_beam, next_index)  # [B, K]: the beam each new running beam extends

        # Finished hypotheses: the best K of the old ones and the newly finished among the top K candidates.
        just_finished = hits & top_k_mask[None, :]
        final_score = top_score / (step + 1.0) ** settings.length_penalty
        full = jnp.all(finished, axis=1, keepdims=True) & (settings.early_stopping is True)
        final_score = final_score + full * NEG + (~unsatisfied)[:, None] * NEG + (~just_finished) * NEG
        merged_score = jnp.concatenate([fin_score, final_score], axis=1)  # [B, K + M]
        keep = jax.lax.top_k(merged_score, k_beams)[1]
        fin_seq = _gather(jnp.concatenate([fin_seq, cand_seq], axis=1), keep)
        fin_score = _gather(merged_score, keep)
        fin_len = _gather(jnp.concatenate([fin_len, jnp.full((b, m), step + 1, jnp.int32)], axis=1), keep)
        finished = _gather(jnp.concatenate([finished, just_finished], axis=1), keep)

        # Can a running beam still beat the worst finished hypothesis? (transformers' early-stop heuristic)
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            best_length_penalty = max_length_penalty
        else:
            best_length_penalty = (step + 1.0) ** settings.length_penalty
        best_running = next_score[:, :1] / best_length_penalty
        worst_finished = jnp.where(finished, jnp.min(fin_score, axis=1, keepdims=True), NEG)
        unsatisfied = unsatisfied & jnp.any(best_running > worst_finished, axis=1)
        go_on = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (settings.early_stopping is True))
                 & ~jnp.all(hits) & (step < n - 1))

        # Reorder the generated cache's rows to the new beams' parents (a parent is a beam of the same prompt,
        # whose prompt cache rows are equal), then feed each beam's newest token.
        rows = (jnp.arange(b)[:, None] * k_beams + parent).reshape(-1)  # [B*K]
        cache = Cache(prompt_cache, tuple(x[rows] for x in cache.k), tuple(x[rows] for x in cache.v),
                      cache.next_position[rows])
        new_tokens = next_seq[:, :, step].reshape(-1)
        if seen is not None:
            seen = processors.mark_seen(seen[rows], new_tokens)
        logits, cache = jax.lax.cond(go_on, lambda: decode_step(model, params, new_tokens, cache, step),
                                     lambda: (logits, cache))
        return (step + 1, logits, cache._replace(prompt=None), seen, next_seq, next_score, fin_seq, fin_score,
                fin_len, finished, unsatisfied, go_on)

    pad_seq = jnp.full((b, k_beams, n), knobs.pad_id, jnp.int32)
    run_score = jnp.zeros((b, k_beams), jnp.float32).at[:, 1:].set(NEG)  # identical beams: only one may expand
    state = (jnp.int32(0), logits, cache, seen, pad_seq, run_score, pad_seq, jnp.full((b, k_beams), NEG),
             jnp.zeros((b, k_beams), jnp.int32), jnp.zeros((b, k_beams), bool), jnp.ones((b,), bool),
             jnp.bool_(True))
    state = jax.lax.while_loop(lambda s: s[-1], body, state)
    fin_seq, fin_len = state[6], state[8]
    best, length = fin_seq[:, 0], fin_len[:, 0]  # [B, N], [B]
    last = jnp.take_along_axis(best, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    reason = jnp.where(length > 0, end_reason(last, knobs), 0)
    best = jnp.where(jnp.arange(n)[None, :] < length[:, None], best, knobs.pad_id)
    return best, length, reason
