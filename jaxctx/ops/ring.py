"""Context-parallel attention over a mesh axis: ring attention and all-gathered K/V.

Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", arXiv:2310.01889): the sequence is split over the N devices of one mesh axis; each device keeps its
T/N queries and passes its K/V chunk (only the Hkv heads, never repeated for GQA), with the chunk's segment ids
and original positions, around the ring with `lax.ppermute`. After N-1 hops every device has seen every chunk.
Each step runs the blockwise kernel's chunk function (`blockwise.chunk_forward`: the same block update and
block skipping as the single-device kernel) and the partial results are merged by log-sum-exp in float32.
The next hop is issued before the step's compute so XLA can overlap the transfer with it; there is no hop
after the last step.

Backward (explicit `custom_vjp`, FlashAttention-2 style recomputation from the saved output and lse): K/V
travel around the ring again together with their f32 dK/dV accumulators; every device adds its contribution
and passes them on, so after N hops each chunk's gradient arrives back at its owner. dQ never leaves the
device. Per-device memory is O(T/N * block) beyond the inputs in forward and backward.

`strategy="all_gather"` gathers K/V (Hkv heads) over the axis instead and runs the local queries against the
whole sequence (the scheme of Llama 3's context parallelism; cheap when Hkv is small). Its backward re-gathers
K/V (nothing O(T) is saved per layer) and reduce-scatters dK/dV in f32.

Layouts. With causal masking a contiguous split gives the last device N times the work of the first. In the
zigzag layout the sequence is cut into 2N chunks and device r holds chunks r and 2N-1-r, so every device does
the same causal work at every ring step (`ring_work` counts it). The kernel itself never looks at the layout:
it masks by the original positions that travel with the tokens, so any permutation is correct.

Two entry points:
- `ring_attention(q, k, v, *, mesh, ...)`: global arrays in natural order; pads, permutes to the layout,
  runs, permutes back. Any T, any axis size.
- `ring_attention_in_layout(q, k, v, positions, *, mesh, ...)`: inputs already in the layout (see `to_layout`)
  with their original positions; for models, which permute the batch once instead of once per layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxctx.ops.attention import _validate
from jaxctx.ops.blockwise import (PAD_KEY_SEGMENT, PAD_QUERY_SEGMENT, SKIP, block_kind, block_ranges,
                                  chunk_backward, chunk_forward, dropout_args, finish_state, init_state, pick_block,
                                  round_up, softmax_delta)
from jaxctx.ops.buffers import zeros_like_in_loop

STRATEGIES = ("ring", "all_gather")
LAYOUTS = ("zigzag", "contiguous")


# ----------------------------------------------------------------------------------------------------------
# Layouts: which original token sits at which layout position
# ----------------------------------------------------------------------------------------------------------

def _check_layout(layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")


def layout_multiple(n: int, layout: str) -> int:
    """The sequence length must be a multiple of this: 2N chunks for zigzag, N for contiguous."""
    _check_layout(layout)
    return 2 * n if layout == "zigzag" else n


def _check_length(t: int, n: int, layout: str):
    if n < 1 or t % layout_multiple(n, layout):
        raise ValueError(f"sequence length t={t} must be divisible by {layout_multiple(n, layout)} "
                         f"({'2 x ' if layout == 'zigzag' else ''}axis size n={n}) for layout={layout!r}")


def to_layout_index(t: int, n: int, layout: str = "zigzag") -> np.ndarray:
    """[t] int32: layout position p holds original token idx[p] (x_layout = x[:, idx]); also the positions
    `ring_attention_in_layout` needs. Device r of the axis holds layout positions [r*t/n, (r+1)*t/n)."""
    _check_length(t, n, layout)
    return to_layout(np.arange(t, dtype=np.int32)[None], n, layout)[0]


def from_layout_index(t: int, n: int, layout: str = "zigzag") -> np.ndarray:
    """[t] int32, the inverse of `to_layout_index`: x = x_layout[:, idx]."""
    return np.argsort(to_layout_index(t, n, layout)).astype(np.int32)


def to_layout(x, n: int, layout: str = "zigzag", axis: int = 1):
    """Permute a natural-order array (numpy or jax) into the layout along `axis` (by reshapes, not a gather).

    zigzag: [.., 2N chunks of c, ..] -> device r gets (chunk r, chunk 2N-1-r)."""
    _check_length(x.shape[axis], n, layout)
    if layout == "contiguous" or n == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.moveaxis(x, axis, 0)
    shape = x.shape
    c = shape[0] // (2 * n)
    chunks = x.reshape((2, n, c) + shape[1:])  # [first half chunks 0..N-1, second half chunks N..2N-1]
    pairs = xp.stack([chunks[0], xp.flip(chunks[1], axis=0)], axis=1)  # [N, 2, c, ...]: (r, 2N-1-r)
    return xp.moveaxis(pairs.reshape(shape), 0, axis)


def from_layout(x, n: int, layout: str = "zigzag", axis: int = 1):
    """Inverse of `to_layout`: layout order back to natural order along `axis`."""
    _check_length(x.shape[axis], n, layout)
    if layout == "contiguous" or n == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.moveaxis(x, axis, 0)
    shape = x.shape
    pairs = x.reshape((n, 2, shape[0] // (2 * n)) + shape[1:])  # [N, 2, c, ...]
    chunks = xp.concatenate([pairs[:, 0], xp.flip(pairs[:, 1], axis=0)], axis=0)  # chunks 0..2N-1
    return xp.moveaxis(chunks.reshape(shape), 0, axis)


def plan(t: int, n: int, layout: str = "zigzag", block_q: int | None = None, block_k: int | None = None):
    """(padded length, block_q, block_k) the public form uses for a natural-order sequence of length t.

    The padded length is a multiple of the layout's chunk count times both blocks, so every block lies inside
    one chunk: its positions are consecutive and the skip tests are exact (this is what balances zigzag)."""
    m = layout_multiple(n, layout)
    base = -(-t // m)  # tokens per layout chunk before padding
    bq, bk = pick_block(block_q, base), pick_block(block_k, base)
    return round_up(base, math.lcm(bq, bk)) * m, bq, bk


def ring_work(t: int, n: int, *, layout: str = "zigzag", causal: bool = True, block_q: int | None = None,
              block_k: int | None = None, segment_ids=None) -> np.ndarray:
    """[n devices, n ring steps] count of (query block, key block) pairs the ring kernel computes (not skipped).

    Uses the kernel's own plan and block classification (`blockwise.block_kind`), for a natural-order sequence
    of length t (segment_ids: optional [B, t] as given to `ring_attention`)."""
    t_pad, bq, bk = plan(t, n, layout, block_q, block_k)
    pos = to_layout_index(t_pad, n, layout)[None]  # [1, T_pad] original positions in layout order
    q_seg = k_seg = None
    if segment_ids is None and t_pad != t and not causal:
        segment_ids = np.zeros((1, t), np.int32)  # as ring_attention does: padded keys need hiding
    if segment_ids is not None:
        seg, pad = np.asarray(segment_ids, np.int32), ((0, 0), (0, t_pad - t))
        q_seg = to_layout(np.pad(seg, pad, constant_values=PAD_QUERY_SEGMENT), n, layout)
        k_seg = to_layout(np.pad(seg, pad, constant_values=PAD_KEY_SEGMENT), n, layout)
    tl = t_pad // n
    work = np.zeros((n, n), np.int64)
    for r in range(n):
        for s in range(n):
            src = (r - s) % n  # the chunk device r holds at step s (it moves one device per step)
            qs, ks = slice(r * tl, (r + 1) * tl), slice(src * tl, (src + 1) * tl)
            ranges = block_ranges(pos[:, qs], pos[:, ks], None if q_seg is None else q_seg[:, qs],
                                  None if k_seg is None else k_seg[:, ks], bq, bk)
            if not causal and q_seg is None:
                work[r, s] = (tl // bq) * (tl // bk)
                continue
            kinds = block_kind(ranges, np.arange(tl // bq)[:, None], np.arange(tl // bk)[None, :], causal)
            work[r, s] = int(np.sum(np.asarray(kinds) != SKIP))
    return work


def ring_traffic(batch: int, seq_len: int, kv_heads: int, head_dim: int, n: int, *, strategy: str = "ring",
                 dtype="float32", segment_ids: bool = False, position_rows: int = 1, block_q: int | None = None,
                 block_k: int | None = None) -> dict[str, dict[str, int]]:
    """Bytes one device sends per call of `ring_attention_in_layout`, by phase and collective, from the shapes.

    {"fwd": {op: bytes}, "bwd": {op: bytes}}, op an HLO collective name. Follows what the kernel sends, for k/v
    [batch, seq_len, kv_heads, head_dim] of `dtype` split over n devices, positions [position_rows, seq_len]
    int32 and (if `segment_ids`, or when the local blocks pad) segment ids [batch, seq_len] int32. Each device
    holds one chunk: K/V of Tl = seq_len / n tokens (padded to the blocks), plus their positions and segments.
    - ring, forward: the chunk makes n-1 hops (no hop after the last step);
    - ring, backward: the chunk makes n-1 hops again, and its f32 dK/dV make n (the last one home);
    - all_gather, forward: the chunks are gathered ((n-1) chunks arrive at, and leave, every device);
    - all_gather, backward: gathered again (nothing O(T) is saved), and the f32 dK/dV reduce-scattered.
    `jaxctx.bench.collectives.collective_bytes` counts the same from a compiled program (tested).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"ring attention strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if n < 1 or seq_len % n:
        raise ValueError(f"ring_traffic: seq_len={seq_len} must be divisible by the axis size n={n}")
    tl = seq_len // n
    tl_pad = round_up(tl, math.lcm(pick_block(block_q, tl), pick_block(block_k, tl)))
    has_seg = segment_ids or tl_pad != tl  # _local_inputs adds segments to hide padded keys
    kv = 2 * batch * tl_pad * kv_heads * head_dim * jnp.dtype(dtype).itemsize  # K and V of one chunk
    chunk = kv + 4 * tl_pad * (position_rows + (batch if has_seg else 0))  # + int32 positions and segments
    grads = 2 * batch * tl_pad * kv_heads * head_dim * 4  # f32 dK and dV of one chunk
    if n == 1:
        return {"fwd": {}, "bwd": {}}
    if strategy == "ring":
        return {"fwd": {"collective-permute": (n - 1) * chunk},
                "bwd": {"collective-permute": (n - 1) * chunk + n * grads}}
    return {"fwd": {"all-gather": (n - 1) * chunk},
            "bwd": {"all-gather": (n - 1) * chunk, "reduce-scatter": (n - 1) * grads}}


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------

def _check_common(mesh, axis, strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"ring attention strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    names = getattr(mesh, "axis_names", None)
    if names is None:
        raise ValueError(f"ring attention mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in names:
        raise ValueError(f"ring attention axis={axis!r} is not an axis of the mesh (axes: {', '.join(names)})")
    return mesh.shape[axis]


def ring_attention(q, k, v, *, mesh, axis: str = "sequence", causal: bool = False, segment_ids=None,
                   strategy: str = "ring", layout: str = "zigzag", block_q: int | None = None,
                   block_k: int | None = None, dropout_rate: float = 0.0, dropout_key=None):
    """Attention with the sequence split over mesh axis `axis`; same semantics as `jaxctx.ops.attention`.

    q [B, T, H, D], k/v [B, T, Hkv, D] global arrays in natural token order (sharded or not); segment_ids
    optional int [B, T]. Any T (padded internally and masked). Returns [B, T, H, D] in natural order, q's dtype.
    dropout_rate/dropout_key: attention dropout as `jaxctx.ops.attention` (the mask follows the original
    positions, so it equals the one-device mask for any axis size and layout).
    """
    _validate(q, k, v, segment_ids, "blockwise")
    n = _check_common(mesh, axis, strategy)
    _check_layout(layout)
    b, t, h, d = q.shape
    t_pad, bq, bk = plan(t, n, layout, block_q, block_k)
    pad = t_pad - t
    if segment_ids is None and pad and not causal:
        segment_ids = jnp.zeros((b, t), jnp.int32)  # padded keys must be hidden; causal already hides them
    q_seg = k_seg = None
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        q_seg = to_layout(jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=PAD_QUERY_SEGMENT), n, layout)
        k_seg = to_layout(jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=PAD_KEY_SEGMENT), n, layout)
    # Padding continues the positions past T, so under causal masking padded keys follow every real query.
    positions = jnp.asarray(to_layout_index(t_pad, n, layout))[None]  # [1, T_pad]
    q, k, v = (to_layout(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), n, layout) for x in (q, k, v))
    out = _context_parallel(q, k, v, positions, q_seg, k_seg, mesh=mesh, axis=axis, n=n, causal=causal,
                            strategy=strategy, bq=bq, bk=bk, sorted_positions=layout == "contiguous" or n == 1,
                            dropout=dropout_args(dropout_rate, dropout_key))
    return from_layout(out, n, layout)[:, :t]


def ring_attention_in_layout(q, k, v, positions, *, mesh, axis: str = "sequence", causal: bool = False,
                             segment_ids=None, strategy: str = "ring", block_q: int | None = None,
                             block_k: int | None = None, dropout_rate: float = 0.0, dropout_key=None):
    """Ring attention on inputs already permuted to a layout (for models, under an outer jit with the mesh).

    q [B, T, H, D], k/v [B, T, Hkv, D], segment_ids optional int [B, T], all in layout order (sharded or not
    along T over `axis`); positions int [T] or [B, T]: the original position of each token (causal masking
    compares these). T must be divisible by the axis size; each device's T/N tokens are padded locally to the
    blocks if needed. Returns [B, T, H, D] in the same layout order. dropout_rate/dropout_key: as `ring_attention`
    (positions are what the dropout mask follows, so pass the natural token index, not per-document positions).
    """
    _validate(q, k, v, segment_ids, "blockwise")
    n = _check_common(mesh, axis, strategy)
    b, t = q.shape[:2]
    if t % n:
        raise ValueError(f"ring_attention_in_layout: sequence length T={t} of q must be divisible by the size "
                         f"{n} of mesh axis {axis!r}")
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer) or positions.shape not in ((t,), (b, t)):
        raise ValueError(f"ring_attention_in_layout: positions must be an integer array [T] = ({t},) or [B, T] = "
                         f"{(b, t)}, got {positions.dtype} {positions.shape}")
    positions = positions.astype(jnp.int32).reshape(-1, t)  # [P, T], P = 1 or B
    tl = t // n
    bq, bk = pick_block(block_q, tl), pick_block(block_k, tl)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _context_parallel(q, k, v, positions, seg, seg, mesh=mesh, axis=axis, n=n, causal=causal,
                             strategy=strategy, bq=bq, bk=bk, sorted_positions=False,
                             dropout=dropout_args(dropout_rate, dropout_key))


# ----------------------------------------------------------------------------------------------------------
# shard_map over the axis
# ----------------------------------------------------------------------------------------------------------

def _context_parallel(q, k, v, positions, q_seg, k_seg, *, mesh, axis, n, causal, strategy, bq, bk,
                      sorted_positions, dropout=(None, 0.0)):
    """q [B, T, H, D], k/v [B, T, Hkv, D], positions [P, T], q_seg/k_seg [B, T] or None; T in layout order.
    dropout: (key words uint32[2] or None, rate) from `blockwise.dropout_args`."""
    words, rate = dropout
    statics = _Statics(mesh, axis, n, causal, strategy, bq, bk, sorted_positions, rate)
    return _attend(q, k, v, positions, q_seg, k_seg, words, statics)


class _Statics(NamedTuple):
    """The hashable, non-differentiable settings of one context-parallel call."""

    mesh: Any
    axis: str
    n: int
    causal: bool
    strategy: str
    bq: int
    bk: int
    sorted_positions: bool
    dropout_rate: float  # attention dropout; used only when a key is given


# One custom VJP around the whole context-parallel call; its forward and backward are each one shard_map over
# the axis (the forward saves only the local inputs, the output and the lse).
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, positions, q_seg, k_seg, words, st):
    return _attend_fwd(q, k, v, positions, q_seg, k_seg, words, st)[0]


def _dropout_in(words, st):
    """shard_map operands and in_specs for the dropout key (replicated: every device draws from the same key)."""
    return ((), ()) if words is None else ((words,), (P(),))


def _attend_fwd(q, k, v, positions, q_seg, k_seg, words, st):
    has_seg = q_seg is not None
    # Positions and segment ids are the same for every layer. Under a scan over layers, autodiff would hoist
    # everything computed from them alone (every (ring step, q block, k block) mask: [N-1, Tl/bq, Tl/bk, ...,
    # bq, bk]) out of the loop as saved residuals -- terabytes at 1M tokens. Tying them to q keeps the masks
    # inside the loop, computed block by block.
    q, positions, q_seg, k_seg = lax.optimization_barrier((q, positions, q_seg, k_seg))

    def body(q, k, v, pos, *rest):
        # Per device: q [B, Tl, H, D], k/v [B, Tl, Hkv, D], pos [P, Tl], segs [B, Tl] (Tl = T / N).
        segs, dropout = _split_rest(rest, has_seg, st)
        b, tl, h, d = q.shape
        qg, k, v, pos, qs, ks = _local_inputs(q, k, v, pos, segs, st)
        fwd = _ring_forward if st.strategy == "ring" else _gathered_forward
        out, lse = fwd(qg, k, v, pos, pos, qs, ks, st.axis, st.n, st.causal, st.bq, st.bk, st.sorted_positions,
                       dropout)
        return out[:, :tl].reshape(b, tl, h, d), lse  # out [B, Tl, H, D]; lse [B, Hkv, G, Tl_pad] f32

    segs = (q_seg, k_seg) if has_seg else ()
    drop_args, drop_specs = _dropout_in(words, st)
    spec = P(None, st.axis)  # only the length axis is manual; batch/head shardings stay with the compiler
    f = jax.shard_map(body, mesh=st.mesh, in_specs=(spec,) * (4 + len(segs)) + drop_specs,
                      out_specs=(spec, P(None, None, None, st.axis)), axis_names=frozenset({st.axis}),
                      check_vma=False)
    out, lse = f(q, k, v, positions, *segs, *drop_args)
    return out, (q, k, v, positions, q_seg, k_seg, words, out, lse)


def _split_rest(rest, has_seg, st):
    """shard_map body's trailing operands -> (segment ids tuple, dropout (words, rate) or None)."""
    segs = tuple(rest[:2]) if has_seg else ()
    words = rest[2 if has_seg else 0:]
    return segs, ((words[0], st.dropout_rate) if words else None)


def _attend_bwd(st, res, d_out):
    q, k, v, positions, q_seg, k_seg, words, out, lse = res
    has_seg = q_seg is not None

    def body(q, k, v, pos, out, lse, d_out, *rest):
        segs, dropout = _split_rest(rest, has_seg, st)
        b, tl, h, d = q.shape
        qg, k_p, v_p, pos, qs, ks = _local_inputs(q, k, v, pos, segs, st)
        hkv, tl_pad = k_p.shape[2], k_p.shape[1]

        def like_q(x):  # [B, Tl, H, D] -> [B, Tl_pad, Hkv, G, D]; padded rows get zero output and cotangent
            x = jnp.pad(x, ((0, 0), (0, tl_pad - tl), (0, 0), (0, 0))) if tl_pad != tl else x
            return x.reshape(b, tl_pad, hkv, h // hkv, d)

        bwd = _ring_backward if st.strategy == "ring" else _gathered_backward
        dq, dk, dv = bwd(qg, k_p, v_p, pos, pos, qs, ks, like_q(out), lse, like_q(d_out), st.axis, st.n, st.causal,
                         st.bq, st.bk, st.sorted_positions, dropout)
        return (dq[:, :tl].reshape(b, tl, h, d).astype(q.dtype), dk[:, :tl].astype(k.dtype),
                dv[:, :tl].astype(v.dtype))

    segs = (q_seg, k_seg) if has_seg else ()
    drop_args, drop_specs = _dropout_in(words, st)
    spec = P(None, st.axis)
    f = jax.shard_map(body, mesh=st.mesh, in_specs=(spec,) * 4 + (spec, P(None, None, None, st.axis), spec)
                      + (spec,) * len(segs) + drop_specs, out_specs=(spec, spec, spec),
                      axis_names=frozenset({st.axis}), check_vma=False)
    dq, dk, dv = f(q, k, v, positions, out, lse, d_out, *segs, *drop_args)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _local_inputs(q, k, v, pos, segs, st):
    """One device's inputs padded to its blocks: q [B, Tl_pad, Hkv, G, D], k/v [B, Tl_pad, Hkv, D], pos, segs."""
    b, tl, h, d = q.shape
    hkv = k.shape[2]
    q_seg, k_seg = segs if segs else (None, None)
    tl_pad = round_up(tl, math.lcm(st.bq, st.bk))
    if tl_pad != tl:
        # Only the in-layout form gets here: pad this device's tokens; padded keys get a segment of their own,
        # padded positions repeat the last one (keeps the block ranges tight).
        if q_seg is None:
            q_seg = k_seg = jnp.zeros((b, tl), jnp.int32)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, tl_pad - tl)), constant_values=PAD_QUERY_SEGMENT)
        k_seg = jnp.pad(k_seg, ((0, 0), (0, tl_pad - tl)), constant_values=PAD_KEY_SEGMENT)
        pos = jnp.pad(pos, ((0, 0), (0, tl_pad - tl)), mode="edge")
        q, k, v = (jnp.pad(x, ((0, 0), (0, tl_pad - tl), (0, 0), (0, 0))) for x in (q, k, v))
    qg = q.reshape(b, tl_pad, hkv, h // hkv, d)  # [B, Tl, Hkv, G, D]: each k/v head serves G query heads
    return qg, k, v, pos, q_seg, k_seg


def _rotate(x, axis, n):
    """Send to the next device on the ring: device r receives device r-1's value (a pytree)."""
    return lax.ppermute(x, axis, perm=[(r, (r + 1) % n) for r in range(n)])


def _visible(q_pos, k_pos, q_seg, k_seg, causal):
    """Scalar bool: may any local query see any key of this chunk? (whole-chunk range test)."""
    if not causal and q_seg is None:
        return jnp.bool_(True)
    r = block_ranges(q_pos, k_pos, q_seg, k_seg, q_pos.shape[1], k_pos.shape[1])
    return block_kind(r, 0, 0, causal) != SKIP


# ----------------------------------------------------------------------------------------------------------
# strategy="ring"
# ----------------------------------------------------------------------------------------------------------

def _ring_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, axis, n, causal, bq, bk, sorted_positions, dropout=None):
    """Local q [B, Tl, Hkv, G, D] against every chunk of the ring -> out [B, Tl, Hkv, G, D] (q dtype), lse f32.

    The running softmax statistics (acc f32 [B, Hkv, G, Tl, D], row max and row sum [B, Hkv, G, Tl]) carry over
    from one chunk to the next: merging chunks by log-sum-exp is the same online-softmax update as merging
    blocks."""
    kw = dict(causal=causal, bq=bq, bk=bk, sorted_positions=sorted_positions, dropout=dropout)

    def visit(chunk, state):
        kc, vc, kp, ks = chunk
        # Skip the whole chunk when no local query can see any of its keys (causal: all its keys come later).
        return lax.cond(_visible(q_pos, kp, q_seg, ks, causal),
                        lambda st: chunk_forward(q, kc, vc, q_pos, kp, q_seg, ks, state=st, **kw),
                        lambda st: st, state)

    def step(_, carry):
        chunk, state = carry
        nxt = _rotate(chunk, axis, n)  # issued first: the transfer can overlap this step's compute
        return nxt, visit(chunk, state)

    chunk, state = lax.fori_loop(0, n - 1, step, ((k, v, k_pos, k_seg), init_state(q)))
    return finish_state(visit(chunk, state), q.dtype)  # the last chunk: no hop after it


def _ring_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, axis, n, causal, bq, bk,
                   sorted_positions, dropout=None):
    kw = dict(causal=causal, bq=bq, bk=bk, sorted_positions=sorted_positions, dropout=dropout)
    delta = softmax_delta(out, d_out)  # [B, Hkv, G, Tl], from the final output: the same for every chunk

    def visit(chunk, grads):
        kc, vc, kp, ks = chunk
        return lax.cond(_visible(q_pos, kp, q_seg, ks, causal),
                        lambda g: chunk_backward(q, kc, vc, q_pos, kp, q_seg, ks, lse, delta, d_out, grads=g, **kw),
                        lambda g: g, grads)

    def step(_, carry):
        chunk, grads = carry
        nxt = _rotate(chunk, axis, n)
        dq, dk, dv = visit(chunk, grads)
        # The chunk's dK/dV accumulators (f32 [B, Tl, Hkv, D]) follow the chunk to the next device; dQ stays.
        dk, dv = _rotate((dk, dv), axis, n)
        return nxt, (dq, dk, dv)

    zeros_kv = zeros_like_in_loop(d_out, k.shape, jnp.float32)
    init = ((k, v, k_pos, k_seg), (zeros_like_in_loop(d_out, q.shape, jnp.float32), zeros_kv, zeros_kv))
    chunk, grads = lax.fori_loop(0, n - 1, step, init)
    dq, dk, dv = visit(chunk, grads)
    if n > 1:
        # The chunk held now belongs to the next device; its completed gradient makes the last hop home.
        dk, dv = _rotate((dk, dv), axis, n)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# strategy="all_gather"
# ----------------------------------------------------------------------------------------------------------

def _gather(x, axis):
    return None if x is None else lax.all_gather(x, axis, axis=1, tiled=True)


def _gathered_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, axis, n, causal, bq, bk, sorted_positions,
                      dropout=None):
    """Local queries against K/V of the whole sequence (Hkv heads, gathered): out, lse. Nothing O(T) is
    saved: the backward gathers K/V again."""
    return chunk_forward(q, _gather(k, axis), _gather(v, axis), q_pos, _gather(k_pos, axis), q_seg,
                         _gather(k_seg, axis), causal=causal, bq=bq, bk=bk, sorted_positions=sorted_positions,
                         dropout=dropout)


def _gathered_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, axis, n, causal, bq, bk,
                       sorted_positions, dropout=None):
    dq, dk, dv = chunk_backward(q, _gather(k, axis), _gather(v, axis), q_pos, _gather(k_pos, axis), q_seg,
                                _gather(k_seg, axis), lse, softmax_delta(out, d_out), d_out, causal=causal,
                                bq=bq, bk=bk, sorted_positions=sorted_positions, dropout=dropout)
    # Every device holds partial dK/dV for the whole sequence: sum them onto the owners, in f32.
    dk, dv = (lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True) for x in (dk, dv))
    return dq, dk, dv
