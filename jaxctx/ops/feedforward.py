"""Blockwise feed-forward and chunked cross-entropy: the two O(T * vocab or T * d_ff) activations, cut into chunks.

From the Blockwise Parallel Transformer (Liu & Abbeel, 2023, arXiv:2305.19370): once attention is blockwise, the
largest activations left are the MLP's [B, T, d_ff] intermediate and the loss's [B, T, vocab] logits. Both are
position-wise, so they can be computed over sequence chunks of C tokens; wrapping each chunk in `jax.checkpoint`
makes the backward pass recompute the chunk instead of storing it, so at any time only [B, C, d_ff] (or
[B, C, vocab]) exists.

- `blockwise_feedforward(fn, x, chunk=C)`: any position-wise `fn` ([B, t, D] -> [B, t, D']) over chunks.
- `chunked_cross_entropy(hidden, head, bias, targets, weights, chunk=C)`: summed token cross-entropy without the
  full logits; `cross_entropy(...)` is the unchunked reference with the same signature (minus `chunk`).

The head matrix comes in either layout (`head_layout`): "dv" for an output kernel [D, V] (untied LLaMA `lm_head`)
or "vd" for an embedding table [V, D] (tied GPT-2/BERT decoders). Passing the table as is avoids a transposed copy
of a [V, D] parameter; the einsum contracts the right axis either way.

Chunks are taken along T with padding to a multiple of C, so any T works. Padded tokens are computed and thrown
away (MLP) or carry weight 0 (loss), so they change neither values nor gradients.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

HEAD_LAYOUTS = ("dv", "vd")


# ----------------------------------------------------------------------------------------------------------
# Chunking helpers: [B, T, ...] <-> [N, B, C, ...]
# ----------------------------------------------------------------------------------------------------------

def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [N, B, C, ...] with N = ceil(T / C); the tail is zero-padded.

    The chunk axis goes first because `lax.scan`/`lax.map` iterate over the leading axis.
    """
    b, t = x.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, n, chunk, *x.shape[2:])  # [B, N, C, ...]
    return jnp.moveaxis(x, 1, 0)  # [N, B, C, ...]


def _from_chunks(y: jax.Array, t: int) -> jax.Array:
    """[N, B, C, ...] -> [B, T, ...], dropping the padded tail."""
    y = jnp.moveaxis(y, 0, 1)  # [B, N, C, ...]
    y = y.reshape(y.shape[0], -1, *y.shape[3:])  # [B, N*C, ...]
    return y[:, :t]


def _check_chunk(name: str, chunk: int) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"{name}={chunk!r} must be a non-negative integer (0 turns chunking off)")


# ----------------------------------------------------------------------------------------------------------
# Blockwise feed-forward
# ----------------------------------------------------------------------------------------------------------

def blockwise_feedforward(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, chunk: int) -> jax.Array:
    """Apply a position-wise `fn` to `x` in sequence chunks, each rematerialised in the backward pass.

    Args:
      fn: pure function [B, t, D] -> [B, t, D'] that treats every position independently (an MLP). It may close
        over parameter arrays; they are loop constants, not per-chunk residuals.
      x: [B, T, D].
      chunk: tokens per chunk; 0 calls `fn(x)` directly (no chunking, no remat).
    Returns:
      [B, T, D'], equal to `fn(x)` (up to float reassociation, which position-wise maths does not have).
    """
    _check_chunk("chunk", chunk)
    if chunk == 0:
        return fn(x)
    t = x.shape[1]
    chunk = min(chunk, t)  # a chunk longer than T would only add padding
    xs = _to_chunks(x, chunk)  # [N, B, C, D]
    # checkpoint: the backward pass recomputes fn's [B, C, d_ff] intermediate per chunk instead of stacking all
    # N of them. prevent_cse=False is safe (and faster) because lax.map's loop already stops XLA from CSE-ing
    # the recomputation into the forward.
    ys = lax.map(jax.checkpoint(fn, prevent_cse=False), xs)  # [N, B, C, D']
    return _from_chunks(ys, t)


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy: unchunked reference and chunked
# ----------------------------------------------------------------------------------------------------------

def project_logits(hidden: jax.Array, head: jax.Array, bias: jax.Array | None = None, *,
                   head_layout: str = "dv") -> jax.Array:
    """Vocabulary logits in float32.

    hidden [..., D] in the compute dtype; head [D, V] ("dv") or [V, D] ("vd"), cast to hidden's dtype; bias [V] or
    None. The matmul accumulates in float32 (`preferred_element_type`), so bf16 inputs still give f32 logits
    without an f32 copy of the head.
    """
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout={head_layout!r} must be 'dv' (kernel [D, V]) or 'vd' (embedding [V, D])")
    spec = "...d,dv->...v" if head_layout == "dv" else "...d,vd->...v"
    logits = jnp.einsum(spec, hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return logits


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted sum of -log softmax(logits)[target] and the sum of weights, both f32 scalars.

    logits [..., V] (any float dtype; computed in f32); targets [...] int; weights [...]. Targets at weight-0
    positions may hold anything (e.g. -100): they are clipped into range, so the gather never reads out of bounds
    (which would give NaN, and NaN * 0 is NaN).
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [...]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def cross_entropy(hidden: jax.Array, head: jax.Array, bias: jax.Array | None, targets: jax.Array,
                  weights: jax.Array, *, head_layout: str = "dv") -> tuple[jax.Array, jax.Array]:
    """Unchunked reference: materialises [B, T, V] f32 logits. Returns (loss_sum, weight_sum)."""
    logits = project_logits(hidden, head, bias, head_layout=head_layout)  # [B, T, V]
    return token_cross_entropy(logits, targets, weights)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, bias: jax.Array | None, targets: jax.Array,
                          weights: jax.Array, *, chunk: int, head_layout: str = "dv") -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy over sequence chunks; [B, T, V] logits never exist, forward or backward.

    Args:
      hidden: [B, T, D] final hidden states (compute dtype).
      head: [D, V] when head_layout="dv" (an output kernel), [V, D] when "vd" (a tied embedding table).
      bias: [V] output bias or None.
      targets: [B, T] int token ids; weights: [B, T] (0 where a position does not count).
      chunk: tokens per chunk; 0 falls back to the unchunked `cross_entropy`.
    Returns:
      (loss_sum, weight_sum): f32 scalars; the mean loss is loss_sum / weight_sum (kept apart so callers can sum
      across micro-batches and devices before dividing).
    """
    _check_chunk("chunk", chunk)
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(f"chunked_cross_entropy expects hidden [B, T, D] and targets/weights [B, T]; got hidden "
                         f"{hidden.shape}, targets {targets.shape}, weights {weights.shape}")
    if chunk == 0:
        return cross_entropy(hidden, head, bias, targets, weights, head_layout=head_layout)
    chunk = min(chunk, hidden.shape[1])
    weights = weights.astype(jnp.float32)
    xs = (_to_chunks(hidden, chunk), _to_chunks(targets, chunk), _to_chunks(weights, chunk))  # [N, B, C, ...]

    # checkpoint: only the chunk's inputs are saved; the backward recomputes its [B, C, V] logits and softmax.
    # head and bias are explicit arguments (loop constants) so their cotangents are summed over chunks by scan.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(head, bias, h, tgt, w):
        logits = project_logits(h, head, bias, head_layout=head_layout)  # [B, C, V] f32
        return token_cross_entropy(logits, tgt, w)[0]

    def body(loss_sum, chunk_xs):
        return loss_sum + chunk_loss(head, bias, *chunk_xs), None

    loss_sum, _ = lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return loss_sum, jnp.sum(weights)
