"""Perplexity over a corpus by the sliding-window method, and the per-position loss curve.

The corpus is tokenized document by document and joined into one stream with the tokenizer's separator
(EOS, as training packs documents). Windows of seq_len tokens start every `stride` tokens, exactly as in
transformers' perplexity guide ("Perplexity of fixed-length models"): each window labels only the tokens the
previous window did not reach, with everything before them as context, so with stride < seq_len every scored
token has at least seq_len - stride tokens of context; the last window ends at the end of the stream. As in the
guide, a window's first token is never a target (nothing precedes it in the window), so with stride == seq_len
one token per window goes unscored. One difference, on purpose: the guide weights each window's mean loss by
(labelled tokens - 1), which is one token off whenever stride < seq_len; here every scored token counts once,
so the perplexity is exactly exp(sum of token losses / tokens scored).

The per-position curve uses every position of every window (context positions too, which the model computes
anyway): the loss of predicting the token at window offset j+1 from the j+1 tokens before it, averaged within
log-spaced buckets of context length [1, 2), [2, 4), ... up to seq_len. A model that uses its context shows the
loss falling with position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

LOSS_CHUNK = 512  # tokens per chunk of the vocabulary projection: [B, chunk, V] logits at a time, never [B, T, V]


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream; targets at stream index >= score_from are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows of transformers' sliding-window perplexity; a target is scored at most once."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}]")
    windows, scored_to = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        windows.append(Window(begin, end, scored_to))
        scored_to = end
        if end == num_tokens:
            break
    return windows


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Log-spaced context-length buckets [lo, hi) covering 1..seq_len-1: (1, 2), (2, 4), (4, 8), ..."""
    edges = [1]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return list(zip(edges[:-1], edges[1:]))


def token_losses(model, params, ids: jax.Array) -> jax.Array:
    """-log p(ids[:, j+1] | ids[:, :j+1]) for j < T-1 -> [B, T-1] float32, the vocabulary projected in chunks."""
    hidden = model.apply({"params": params}, ids, method="hidden")[:, :-1]  # [B, T-1, D]
    matrix, bias, layout = model.apply({"params": params}, method="head")
    targets = ids[:, 1:]
    b, t = targets.shape
    chunk = min(LOSS_CHUNK, t)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, hidden.shape[-1])
    targets_c = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk)

    def one(args):  # [B, chunk, D], [B, chunk] -> [B, chunk]
        from jaxctx.ops import project_logits

        h, y = args
        logits = project_logits(h, matrix, bias, head_layout=layout)  # [B, chunk, V] f32
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]

    losses = jax.lax.map(one, (hidden.swapaxes(0, 1), targets_c.swapaxes(0, 1)))  # [chunks, B, chunk]
    return losses.swapaxes(0, 1).reshape(b, -1)[:, :t]


@dataclass
class PerplexityResult:
    perplexity: float
    mean_loss: float
    tokens_scored: int
    windows: int
    per_position: list[dict]  # {"context_from", "context_to", "mean_loss", "tokens"} per bucket

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_loss": self.mean_loss, "tokens_scored": self.tokens_scored,
                "windows": self.windows, "per_position": self.per_position}


def evaluate_stream(model, params, stream: np.ndarray, seq_len: int, stride: int, *, batch_size: int = 4,
                    pad_id: int = 0) -> PerplexityResult:
    """Sliding-window perplexity and the per-position curve of one token stream (int ids [N])."""
    stream = np.asarray(stream, np.int32)
    if stream.size < 2:
        raise ValueError(f"the corpus has {stream.size} token(s); perplexity needs at least 2")
    windows = sliding_windows(stream.size, seq_len, stride)
    width = min(seq_len, stream.size)
    losses_fn = jax.jit(lambda ids: token_losses(model, params, ids))
    nll_sum, scored = 0.0, 0
    position_sum = np.zeros(width - 1, np.float64)
    position_count = np.zeros(width - 1, np.int64)
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        ids = np.full((batch_size, width), pad_id, np.int32)
        for row, w in enumerate(group):
            ids[row, :w.end - w.begin] = stream[w.begin:w.end]
        losses = np.asarray(losses_fn(ids), np.float64)  # [batch, width-1]: target at offset j+1
        for row, w in enumerate(group):
            n = w.end - w.begin - 1  # targets in this window
            target_index = w.begin + 1 + np.arange(n)
            keep = target_index >= w.score_from
            nll_sum += float(losses[row, :n][keep].sum())
            scored += int(keep.sum())
            position_sum[:n] += losses[row, :n]
            position_count[:n] += 1
    curve = []
    for lo, hi in position_buckets(width):
        total, count = position_sum[lo - 1:hi - 1].sum(), position_count[lo - 1:hi - 1].sum()
        curve.append({"context_from": lo, "context_to": hi - 1, "mean_loss": float(total / count) if count else None,
                      "tokens": int(count)})
    mean = nll_sum / scored
    return PerplexityResult(float(math.exp(mean)), float(mean), scored, len(windows), curve)
