"""Blockwise feed-forward and chunked cross-entropy: the two O(T * vocab or T * d_ff) activations, cut into chunks.

From the Blockwise Parallel Transformer (Liu & Abbeel, 2023, arXiv:2305.19370): once attention is blockwise, the
largest activations left are the MLP's [B, T, d_ff] intermediate and the loss's [B, T, vocab] logits. Both are
position-wise, so they can be computed over sequence chunks of C tokens. The MLP's backward pass recomputes each
chunk instead of storing it; the loss, a scalar, computes each chunk's gradient already in the forward pass
(written out, see `_ce_chunk_grads`; scaled by the incoming cotangent in the backward), so its logits are never
recomputed. At any time only [B, C, d_ff] (or [B, C, vocab]) exists. Chunks are read and written in place (see
`_map_chunks`): no [N, B, C, D] copies.

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

from jaxctx.ops.buffers import zeros_like_in_loop

HEAD_LAYOUTS = ("dv", "vd")


# ----------------------------------------------------------------------------------------------------------
# Chunked loops that read and write the full-length arrays in place
# ----------------------------------------------------------------------------------------------------------
# Why custom VJPs instead of `lax.map(jax.checkpoint(fn), chunks)`: mapping needs the input reshaped to
# [N, B, C, D] with the chunk axis first (a full-length copy), its output back from [N, B, C, D'] (another), and
# autodiff repeats both for the cotangents. At long T each of those copies is as large as an activation: four of
# them in one layer's backward was a third of the live memory of a 128K-token GPT-2 step. Here every chunk is a
# `dynamic_slice` of the [B, T, ...] input and its result a `dynamic_update_slice` into the [B, T, ...] output,
# forward and backward, so the only full-length arrays are the input, the output and their cotangents. The
# backward recomputes each chunk's forward under `jax.vjp` (the rematerialisation) and sums the cotangents of the
# loop constants (parameters) in float32.

def _pad_to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """Zero-pad [B, T, ...] along T to a multiple of `chunk` (no copy when T already is one)."""
    pad = -x.shape[1] % chunk
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _chunk(x: jax.Array, i, chunk: int) -> jax.Array:
    """Chunk i of [B, Tp, ...]: [B, C, ...]."""
    return lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _zero_cotangents(consts: tuple, anchor: jax.Array) -> tuple:
    """float32 (or wider) accumulators for the cotangents of the float loop constants; None for the others.

    Made from `anchor` (the incoming cotangent) so XLA cannot schedule them before the backward reaches here.
    """
    return tuple(zeros_like_in_loop(anchor, c.shape, jnp.promote_types(c.dtype, jnp.float32))
                 if c is not None and jnp.issubdtype(c.dtype, jnp.inexact) else None for c in consts)


def _add_cotangents(acc: tuple, new: tuple) -> tuple:
    return tuple(None if a is None else a + n.astype(a.dtype) for a, n in zip(acc, new))


def _cast_cotangents(acc: tuple, consts: tuple) -> tuple:
    return tuple(None if a is None else a.astype(c.dtype) for a, c in zip(acc, consts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _map_chunks(fn: Callable, chunk: int, x: jax.Array, consts: tuple) -> jax.Array:
    """fn(x_chunk, *consts) over the chunks of x [B, Tp, D] (Tp a multiple of chunk) -> [B, Tp, D']."""
    b, tp = x.shape[:2]
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((b, chunk) + x.shape[2:], x.dtype), *consts)  # [B, C, D']

    def body(i, y):
        return lax.dynamic_update_slice_in_dim(y, fn(_chunk(x, i, chunk), *consts).astype(out.dtype), i * chunk,
                                               axis=1)

    return lax.fori_loop(0, tp // chunk, body, zeros_like_in_loop(x, (b, tp) + out.shape[2:], out.dtype))


def _map_chunks_fwd(fn, chunk, x, consts):
    return _map_chunks(fn, chunk, x, consts), (x, consts)


def _backward_over_chunks(chunk_vjp: Callable, chunk: int, x: jax.Array, consts: tuple, anchor: jax.Array):
    """The shared backward loop: chunk_vjp(i) -> (dx_chunk [B, C, ...], const cotangents) for chunk i.

    dx is written in place chunk by chunk; the constants' cotangents are summed in float32 and cast back at the end.
    The accumulators are made from `anchor` so XLA cannot materialise them before the backward reaches this loop.
    """
    def body(i, carry):
        dx, dconsts = carry
        dx_chunk, dconsts_chunk = chunk_vjp(i)
        dx = lax.dynamic_update_slice_in_dim(dx, dx_chunk.astype(dx.dtype), i * chunk, axis=1)
        return dx, _add_cotangents(dconsts, dconsts_chunk)

    init = (zeros_like_in_loop(anchor, x.shape, x.dtype), _zero_cotangents(consts, anchor))
    dx, dconsts = lax.fori_loop(0, x.shape[1] // chunk, body, init)
    return dx, _cast_cotangents(dconsts, consts)


def _map_chunks_bwd(fn, chunk, residuals, dy):
    x, consts = residuals

    def chunk_vjp(i):
        _, vjp = jax.vjp(fn, _chunk(x, i, chunk), *consts)  # recomputes the chunk: [B, C, d_ff] lives only here
        dx_chunk, *dconsts_chunk = vjp(_chunk(dy, i, chunk))
        return dx_chunk, dconsts_chunk

    return _backward_over_chunks(chunk_vjp, chunk, x, consts, anchor=dy)


_map_chunks.defvjp(_map_chunks_fwd, _map_chunks_bwd)


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
        over parameter arrays: `jax.closure_convert` turns them into explicit loop constants whose gradients are
        summed over chunks (in float32).
      x: [B, T, D].
      chunk: tokens per chunk; 0 calls `fn(x)` directly (no chunking, no remat).
    Returns:
      [B, T, D'], equal to `fn(x)` (up to float reassociation, which position-wise maths does not have).
    """
    _check_chunk("chunk", chunk)
    if chunk == 0:
        return fn(x)
    b, t = x.shape[:2]
    chunk = min(chunk, t)  # a chunk longer than T would only add padding
    xp = _pad_to_chunks(x, chunk)  # [B, Tp, D]
    converted, consts = jax.closure_convert(fn, jax.ShapeDtypeStruct((b, chunk) + x.shape[2:], x.dtype))
    y = _map_chunks(converted, chunk, xp, tuple(consts))  # [B, Tp, D']
    return y[:, :t] if xp.shape[1] != t else y


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


# The chunked loss's gradient, written out rather than taken by autodiff, for two savings on XLA:CPU (GPT-2
# 6x512 at T=4096, 4 chunks of 1024: the loss and its gradients 3.1 -> 2.8 s, of which 2.4 s are the head GEMMs):
# - Autodiff gave the head's gradient as dlogits^T h, a contraction over the chunk's tokens, the major axis of both
#   operands, and XLA copied every [C, V] dlogits tile transposed first (70 ms a chunk). Here it is accumulated as
#   [D, V] = h^T dlogits, a plain GEMM after transposing the small [C, D] chunk, and transposed once, in the
#   backward, when the head is a [V, D] table.
# - dlogits = w * (softmax - one_hot) = (w / s) * (e - s * one_hot), with e = exp(logits - max) and s its row
#   sum. The per-row factor w / s is applied to the GEMMs' small operand or result ([C, D]) instead of to the
#   [C, V] tile, and the one-hot part is a scatter of one entry per token: the only [C, V] passes are the max,
#   the exp and the sum.

def _chunk_logits(h, head, bias, layout: str, constrain: tuple):
    """(h, logits [B, C, V] f32) of one chunk, each under its sharding constraint when one is given."""
    constrain_hidden, constrain_logits = constrain
    if constrain_hidden is not None:
        h = constrain_hidden(h)
    logits = project_logits(h, head, bias, head_layout=layout)
    return h, logits if constrain_logits is None else constrain_logits(logits)


def _ce_chunk_grads(h, targets, weights, head, bias, layout: str, constrain: tuple):
    """One chunk's summed loss and its gradients for a cotangent of 1.

    h [B, C, D]; targets [B, C] int; weights [B, C] f32. Returns (loss f32, dh [B, C, D] in h's dtype, dhead as
    [D, V] f32, dbias [V] f32 or None).
    """
    h, logits = _chunk_logits(h, head, bias, layout, constrain)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)  # as token_cross_entropy: weight-0 targets may be -100
    row_max = jnp.max(logits, axis=-1)  # [B, C]
    e = jnp.exp(logits - row_max[..., None])  # [B, C, V]
    s = jnp.sum(e, axis=-1)  # [B, C], >= 1
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, C]
    loss = jnp.sum((row_max + jnp.log(s) - target_logit) * weights)
    scale = weights / s  # [B, C]: dlogits = scale * (e - s * one_hot)
    b_idx, c_idx = jnp.meshgrid(jnp.arange(e.shape[0]), jnp.arange(e.shape[1]), indexing="ij")
    e = e.at[b_idx, c_idx, targets].add(-s)
    if constrain[1] is not None:
        e = constrain[1](e)
    e = e.astype(h.dtype)
    spec = "bcv,vd->bcd" if layout == "vd" else "bcv,dv->bcd"
    dh = jnp.einsum(spec, e, head.astype(h.dtype), preferred_element_type=jnp.float32) * scale[..., None]
    h_scaled = (h.astype(jnp.float32) * scale[..., None]).astype(h.dtype)  # [B, C, D]
    dhead = jnp.einsum("bcd,bcv->dv", h_scaled, e, preferred_element_type=jnp.float32)  # [D, V]
    dbias = None if bias is None else jnp.einsum("bc,bcv->v", scale.astype(h.dtype), e,
                                                 preferred_element_type=jnp.float32)  # [V]
    return loss, dh.astype(h.dtype), dhead, dbias


def _ce_chunk_loss(h, targets, weights, head, bias, layout: str, constrain: tuple):
    """One chunk's summed loss, value only."""
    return token_cross_entropy(_chunk_logits(h, head, bias, layout, constrain)[1], targets, weights)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_ce_sum(chunk: int, layout: str, constrain: tuple, h, targets, weights, head, bias):
    """Summed token cross-entropy over chunks of h [B, Tp, D] (Tp a multiple of chunk); targets/weights [B, Tp]."""
    def body(i, total):
        return total + _ce_chunk_loss(_chunk(h, i, chunk), _chunk(targets, i, chunk), _chunk(weights, i, chunk),
                                      head, bias, layout, constrain)

    return lax.fori_loop(0, h.shape[1] // chunk, body, jnp.zeros((), jnp.float32))


def _chunked_ce_sum_fwd(chunk, layout, constrain, h, targets, weights, head, bias):
    """The sum and its gradient in one pass over the chunks (each chunk's logits exist once, never recomputed).

    The sum is a scalar, so each chunk's gradient is its gradient for a cotangent of 1, scaled in the backward by
    the incoming one (the fused linear cross-entropy of Liger-Kernel / Cut Cross-Entropy). Residuals: dh
    [B, Tp, D] (which replaces h itself) and the head's and bias's gradients in float32.
    """
    def body(i, carry):
        total, dh, dhead, dbias = carry
        loss, dh_chunk, dhead_chunk, dbias_chunk = _ce_chunk_grads(
            _chunk(h, i, chunk), _chunk(targets, i, chunk), _chunk(weights, i, chunk), head, bias, layout, constrain)
        dh = lax.dynamic_update_slice_in_dim(dh, dh_chunk, i * chunk, axis=1)
        dbias = None if dbias is None else dbias + dbias_chunk
        return total + loss, dh, dhead + dhead_chunk, dbias

    d_model, vocab = h.shape[-1], head.shape[0] if layout == "vd" else head.shape[1]
    init = (jnp.zeros((), jnp.float32), zeros_like_in_loop(h, h.shape, h.dtype),
            zeros_like_in_loop(h, (d_model, vocab), jnp.float32),
            None if bias is None else zeros_like_in_loop(h, bias.shape, jnp.float32))
    total, dh, dhead, dbias = lax.fori_loop(0, h.shape[1] // chunk, body, init)
    return total, (dh, dhead, dbias, head, bias)


def _chunked_ce_sum_bwd(chunk, layout, constrain, residuals, d_total):
    dh, dhead, dbias, head, bias = residuals
    dhead = dhead * d_total  # [D, V] f32
    dhead = (dhead.T if layout == "vd" else dhead).astype(head.dtype)  # one transpose per step, fused with the scale
    dbias = None if bias is None else (dbias * d_total).astype(bias.dtype)
    return dh * d_total.astype(dh.dtype), None, None, dhead, dbias


_chunked_ce_sum.defvjp(_chunked_ce_sum_fwd, _chunked_ce_sum_bwd)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, bias: jax.Array | None, targets: jax.Array,
                          weights: jax.Array, *, chunk: int, head_layout: str = "dv",
                          constrain_hidden: Callable | None = None,
                          constrain_logits: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy over sequence chunks; [B, T, V] logits never exist, forward or backward.

    Args:
      hidden: [B, T, D] final hidden states (compute dtype).
      head: [D, V] when head_layout="dv" (an output kernel), [V, D] when "vd" (a tied embedding table).
      bias: [V] output bias or None.
      targets: [B, T] int token ids; weights: [B, T] (0 where a position does not count).
      chunk: tokens per chunk; 0 falls back to the unchunked `cross_entropy`.
      constrain_hidden, constrain_logits: sharding constraints applied to each chunk's [B, C, D] hidden states and
        [B, C, V] logits inside the loop (the model's logical-axis constraints). Without them a sharded step can
        lose the batch sharding there: a slice inside a loop carries none, and with the head sharded over `fsdp`
        on D, XLA contracted D across devices and all-reduced the whole global batch's [B, C, V] on every device.
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
    # Padded positions get weight 0 (and target 0), so they add nothing to the loss or its gradients.
    padded = [_pad_to_chunks(a, chunk) for a in (hidden, targets, weights)]  # [B, Tp, ...]

    # Only the chunk's inputs are read; under differentiation each chunk's gradient is computed in the forward
    # pass while its [B, C, V] logits exist (see _chunked_ce_sum_fwd), so nothing is recomputed.
    loss_sum = _chunked_ce_sum(chunk, head_layout, (constrain_hidden, constrain_logits), *padded, head, bias)
    return loss_sum, jnp.sum(weights)
