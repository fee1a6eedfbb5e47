"""Blockwise (memory-efficient) attention in pure JAX, for any backend.

Forward: queries and keys are cut into blocks; for each query block the key blocks are visited with a running
row max `m` and row sum `l` (the online softmax of Milakov & Gimelshein 2018, as used by Rabe & Staats 2021,
"Self-attention does not need O(n^2) memory", and FlashAttention, Dao et al. 2022). Only the output and the
per-row log-sum-exp `lse = m + log(l)` are kept for the backward pass.

Backward: a `jax.custom_vjp` recomputes each score block from q, k and `lse` (FlashAttention-2, Dao 2023,
Algorithm 2): the outer loop walks key blocks and accumulates dK, dV in registers-of-the-loop; dQ is accumulated
into one [B, T, H, D] buffer. Nothing T x T is ever stored, so memory is O(T * block) in forward and backward.
(Plain autodiff through a blockwise forward would store every block's probabilities: O(T^2) again.)

The block-level functions (`chunk_forward`, `chunk_backward`) take explicit query and key positions and segment
ids, so the same code serves one device (positions 0..T-1) and one step of ring attention (`ops/ring.py`: local
queries against a visiting key/value chunk whose tokens come from anywhere in the sequence). Every (query block,
key block) pair is classified from the min/max of its positions and segment ids (`block_kind`): skipped when
nothing in it is visible, run without a mask when everything is, masked otherwise. So causal attention costs
about half of full attention, and packed documents skip the blocks between documents.

Numerics: scores, running statistics and accumulators are float32 whatever the input dtype. Masked scores are
-inf; a row whose visible keys are all masked so far keeps m = -inf and contributes zeros (never NaN), and a row
with no visible key at all returns 0 and has lse = -inf (the backward treats it as +inf, so its probabilities
are exactly 0).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxctx.ops.buffers import zeros_like_in_loop
from jaxctx.ops.dropout import attention_keep_block, key_words

DEFAULT_BLOCK = 512  # large blocks amortise loop overhead; a [B, H, 512, 512] f32 tile is 1 MiB per head
# Sentinel segment ids for padded rows: padded keys match nothing, padded queries (discarded) match nothing.
PAD_KEY_SEGMENT = jnp.iinfo(jnp.int32).min
PAD_QUERY_SEGMENT = jnp.iinfo(jnp.int32).min + 1
# block_kind values
SKIP, FULL, MASKED = 0, 1, 2


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_block(requested: int | None, t: int) -> int:
    """Block size actually used for a sequence of length t: the request (or DEFAULT_BLOCK), never much above t."""
    if requested is not None and (not isinstance(requested, int) or requested <= 0):
        raise ValueError(f"attention block size must be a positive integer, got {requested!r}")
    block = DEFAULT_BLOCK if requested is None else requested
    return min(block, round_up(t, 8))


def blockwise_attention(q, k, v, *, causal: bool = False, segment_ids=None, block_q: int | None = None,
                        block_k: int | None = None, dropout_rate: float = 0.0, dropout_key=None):
    """Attention with O(T * block) memory in forward and backward.

    q [B, T, H, D]; k, v [B, T, Hkv, D], H % Hkv == 0; segment_ids optional int [B, T]. Any T works: inputs are
    padded up to a multiple of the block sizes and the padding is masked out. Returns [B, T, H, D] in q's dtype.
    dropout_rate > 0 with a dropout_key (a jax PRNG key) drops attention probabilities with the counter-based
    mask of `jaxctx.ops.dropout` (regenerated in the backward, never stored); otherwise no dropout.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    bq, bk = pick_block(block_q, t), pick_block(block_k, t)
    tq, tk = round_up(t, bq), round_up(t, bk)
    if segment_ids is None and tk != t and not causal:
        # Padded keys must be hidden; under causal masking they already are (they sit after every real query).
        segment_ids = jnp.zeros((b, t), jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        q_seg = jnp.pad(segment_ids, ((0, 0), (0, tq - t)), constant_values=PAD_QUERY_SEGMENT)
        k_seg = jnp.pad(segment_ids, ((0, 0), (0, tk - t)), constant_values=PAD_KEY_SEGMENT)
    else:
        q_seg = k_seg = None
    # GQA without repeating k/v: query heads are viewed as [Hkv, G] so each k/v head serves G query heads.
    qg = q.reshape(b, t, hkv, h // hkv, d)  # [B, T, Hkv, G, D]
    qg = jnp.pad(qg, ((0, 0), (0, tq - t), (0, 0), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, tk - t), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, tk - t), (0, 0), (0, 0)))
    # One device holds the whole sequence in order: positions are 0..T-1 (padding continues past T, which
    # keeps padded keys after every real query under causal masking).
    q_pos = lax.iota(jnp.int32, tq)[None]  # [1, Tq]
    k_pos = lax.iota(jnp.int32, tk)[None]  # [1, Tk]
    words, rate = dropout_args(dropout_rate, dropout_key)
    out = _attention(qg, kp, vp, q_pos, k_pos, q_seg, k_seg, words, causal, bq, bk, rate)  # [B, Tq, Hkv, G, D]
    return out[:, :t].reshape(b, t, h, d)


def dropout_args(rate: float, key):
    """(key words uint32[2] or None, rate) for the kernels: dropout is on only with rate > 0 and a key."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"attention dropout_rate={rate} must be in [0, 1)")
    if rate == 0.0 or key is None:
        return None, 0.0
    return key_words(key), rate


def _dropout(words, rate):
    return None if words is None else (words, rate)


# ----------------------------------------------------------------------------------------------------------
# Block classification from positions and segment ids
# ----------------------------------------------------------------------------------------------------------

class BlockRanges(NamedTuple):
    """Per-block min/max of positions ([P, n] each, P = 1 or B) and segment ids ([B, n] each, or None)."""
    q_pos_lo: jax.Array
    q_pos_hi: jax.Array
    k_pos_lo: jax.Array
    k_pos_hi: jax.Array
    q_seg_lo: jax.Array | None
    q_seg_hi: jax.Array | None
    k_seg_lo: jax.Array | None
    k_seg_hi: jax.Array | None


def block_ranges(q_pos, k_pos, q_seg, k_seg, bq: int, bk: int) -> BlockRanges:
    """Min/max position and segment id of every query block (size bq) and key block (size bk)."""
    def lo_hi(x, blk):
        x = x.reshape(x.shape[0], -1, blk)
        return x.min(-1), x.max(-1)

    segs = (None,) * 4 if q_seg is None else (*lo_hi(q_seg, bq), *lo_hi(k_seg, bk))
    return BlockRanges(*lo_hi(q_pos, bq), *lo_hi(k_pos, bk), *segs)


def block_kind(r: BlockRanges, i, j, causal: bool):
    """SKIP, FULL or MASKED for query block(s) i and key block(s) j (scalars, or broadcastable index arrays).

    The range tests are exact for skipping when every block holds consecutive positions: a causal pair is
    skipped iff its first key comes after its last query; disjoint segment id ranges cannot hold equal ids;
    equal one-value ranges are equal. A pair must be skippable (or fully visible) in every batch row.
    """
    def at(x, idx):
        return jnp.take(x, idx, axis=1)  # [P or B, *idx.shape]

    skip = jnp.zeros((), bool)
    full = jnp.ones((), bool)
    if causal:
        skip = at(r.k_pos_lo, j) > at(r.q_pos_hi, i)
        full = at(r.k_pos_hi, j) <= at(r.q_pos_lo, i)
    if r.q_seg_lo is not None:
        q_lo, q_hi, k_lo, k_hi = at(r.q_seg_lo, i), at(r.q_seg_hi, i), at(r.k_seg_lo, j), at(r.k_seg_hi, j)
        skip = skip | (q_hi < k_lo) | (k_hi < q_lo)
        full = full & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    if jnp.ndim(skip):
        skip = jnp.all(skip, axis=0)
    if jnp.ndim(full):
        full = jnp.all(full, axis=0)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, MASKED))


def _run_block(update, state, i, j, ranges, causal):
    """Apply `update(state, masked)` to block (i, j) unless nothing in it is visible; mask only when needed.

    Packed documents and causal masking make most blocks trivial: only blocks that straddle the diagonal or a
    document boundary pay for the mask.
    """
    if not causal and ranges.q_seg_lo is None:
        return update(state, False)  # everything is visible: no classification at all
    kind = block_kind(ranges, i, j, causal)
    return lax.switch(kind, [lambda st: st, lambda st: update(st, False), lambda st: update(st, True)], state)


def _masked_scores(q_blk, k_blk, qp, kp, qs, ks, masked):
    """Scores of a query block's rows against a key block, -inf where not visible.

    [B, Hkv, R, D] x [B, Hkv, D, bk] -> [B, Hkv, R, bk] float32 (q already scaled; R = G * bq rows, see
    `_query_rows`). qp/kp: [P, R] / [P, bk] positions (None = not causal); qs/ks: [B, R] / [B, bk] segment ids
    (None = no segments).
    """
    s = jnp.einsum("bhrd,bhdk->bhrk", q_blk, k_blk, preferred_element_type=jnp.float32)
    if not masked:
        return s
    mask = None
    if qp is not None:
        mask = (qp[:, :, None] >= kp[:, None, :])[:, None]  # [P, 1, R, bk]
    if qs is not None:
        same = (qs[:, :, None] == ks[:, None, :])[:, None]  # [B, 1, R, bk]
        mask = same if mask is None else mask & same
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


# Operand layouts. Every block matmul is a plain row-major GEMM, [M, K] x [K, N] -> [M, N], batched over (B, Hkv),
# on operand blocks laid out for it when they are sliced: "rows" [B, Hkv, (G,) n, D] (`head_major`) or "cols"
# [B, Hkv, D, (G,) n] (`feature_major`), a small transpose of a [n, H, D] slice. With token-major blocks, or a
# contraction over a non-minor axis (dV = P^T dO), XLA:CPU transposed the [bq, bk] score or probability tiles
# inside every block instead: O(T^2) copies rather than O(T * D). Full-length copies of the operands in both
# layouts were measured too: 2-3% faster at T=8192, for two to three more [T, H, D] arrays of peak memory.

def head_major(x):
    """[B, T, Hkv, G, D] -> [B, Hkv, G, T, D] and [B, T, Hkv, D] -> [B, Hkv, T, D]: blocks are [rows, D]."""
    return jnp.moveaxis(x, 1, -2)


def token_major(x):
    """Inverse of `head_major`."""
    return jnp.moveaxis(x, -2, 1)


def feature_major(x):
    """[B, T, Hkv, G, D] -> [B, Hkv, D, G, T] and [B, T, Hkv, D] -> [B, Hkv, D, T]: blocks are [D, rows]."""
    return jnp.moveaxis(x, 1, -1) if x.ndim == 4 else jnp.transpose(x, (0, 2, 4, 3, 1))


def from_feature_major(x):
    """Inverse of `feature_major` for [B, Hkv, D, T] -> [B, T, Hkv, D]."""
    return jnp.moveaxis(x, -1, 1)


def _query_rows(x, g):
    """Per-query values [P, bq] -> [P, G * bq], one per row of a block whose G query heads are stacked.

    Inside the loops a query block is [B, Hkv, G * bq, D]: the G heads that share a key/value head are rows of one
    GEMM, and every score tile is 4-D. (With a size-1 G axis left in the dots' outputs, XLA:CPU gave them a layout
    it then copied every score tile to undo: 0.3 ms a block at 512 x 512 x 8 heads.)"""
    return x if x is None or g == 1 else jnp.tile(x, (1, g))


def _slice(x, start, size, axis=1):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _dropout_factor(dropout, q_pos, k_pos, b, hkv, g):
    """The block's dropout factor Z = keep / (1 - rate), f32 [B, Hkv, G, bq, bk], or None without dropout.

    The keep bits come from the key and the block's global positions q_pos [P, bq], k_pos [P, bk]
    (`jaxctx.ops.dropout`), so forward, backward, every ring step and the reference draw the same mask.
    """
    if dropout is None:
        return None
    words, rate = dropout
    keep = attention_keep_block(words, rate, q_pos, k_pos, b, hkv, g)
    return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def _times(x, factor):
    return x if factor is None else x * factor


def _visible_range(ranges, idx, n_other, *, over_keys: bool):
    """Loop bounds when positions are sorted (nondecreasing along T): only a prefix/suffix can be visible.

    over_keys=True (forward; idx = query block): key blocks [0, hi) can reach back to query block idx.
    over_keys=False (backward; idx = key block): query blocks [lo, n_other) reach key block idx.
    """
    if over_keys:
        q_hi = jnp.max(ranges.q_pos_hi[:, idx])
        return 0, jnp.sum(jnp.min(ranges.k_pos_lo, axis=0) <= q_hi)
    k_lo = jnp.min(ranges.k_pos_lo[:, idx])
    return n_other - jnp.sum(jnp.max(ranges.q_pos_hi, axis=0) >= k_lo), n_other


# ----------------------------------------------------------------------------------------------------------
# Forward of one (query chunk, key chunk) pair
# ----------------------------------------------------------------------------------------------------------

def chunk_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal: bool, bq: int, bk: int,
                  sorted_positions: bool = False, state=None, dropout=None):
    """Attention of a query chunk against a key chunk, with explicit positions and segment ids.

    q [B, Tq, Hkv, G, D]; k, v [B, Tk, Hkv, D]; q_pos [P, Tq], k_pos [P, Tk] int32 (P = 1 or B); q_seg [B, Tq],
    k_seg [B, Tk] int32 or both None. Tq % bq == Tk % bk == 0. sorted_positions: positions are nondecreasing
    along T, so causal loops can stop early instead of classifying every block.

    state=None: returns out [B, Tq, Hkv, G, D] in q's dtype and lse [B, Hkv, G, Tq] float32 (-inf and out = 0
    for rows that see no key). state=(acc, m, l), the running statistics of earlier chunks (see `init_state`):
    returns them updated with this chunk's keys, so several chunks merge exactly as the blocks of one do.
    dropout: None, or (key words uint32[2], rate) for attention dropout (see `_dropped`).
    """
    b, tq, hkv, g, d = q.shape
    nq, nk = tq // bq, k.shape[1] // bk
    scale = 1.0 / (d ** 0.5)
    ranges = block_ranges(q_pos, k_pos, q_seg, k_seg, bq, bk)
    r = g * bq  # rows of a query block: its G query heads per key/value head, stacked

    def query_block(i, carry):
        q_blk = head_major(_slice(q, i * bq, bq)).reshape(b, hkv, r, d) * jnp.asarray(scale, q.dtype)
        qp, qs = (_query_rows(_slice(x, i * bq, bq), g) for x in (q_pos, q_seg))  # [P, R], [B, R]

        def key_block(j, st):
            return _run_block(lambda st, masked: update(j, st, masked), st, i, j, ranges, causal)

        def update(j, st, masked):
            m, l, acc = st  # [B, Hkv, R], [B, Hkv, R], [B, Hkv, R, D]
            k_blk, v_blk = _slice(k, j * bk, bk), _slice(v, j * bk, bk)  # [B, bk, Hkv, D]
            k_blk, v_blk = feature_major(k_blk), head_major(v_blk)  # [B, Hkv, D, bk], [B, Hkv, bk, D]
            s = _masked_scores(q_blk, k_blk, qp if causal else None, _slice(k_pos, j * bk, bk),
                               qs, _slice(k_seg, j * bk, bk), masked)  # [B, Hkv, R, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: exp(-inf) = 0
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)  # the softmax normaliser counts dropped entries too
            if dropout is not None:
                z = _dropout_factor(dropout, _slice(q_pos, i * bq, bq), _slice(k_pos, j * bk, bk), b, hkv, g)
                p = p * z.reshape(p.shape)
            pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return m_new, l, acc

        if state is None:
            init = (jnp.full((b, hkv, r), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, r), jnp.float32),
                    jnp.zeros((b, hkv, r, d), jnp.float32))
        else:  # continue this query block's statistics from earlier chunks
            acc_buf, m_buf, l_buf = carry
            init = tuple(_slice(x, i * bq, bq, axis=3).reshape(b, hkv, r, *x.shape[4:])
                         for x in (m_buf, l_buf, acc_buf))
        lo, hi = _visible_range(ranges, i, nk, over_keys=True) if causal and sorted_positions else (0, nk)
        m, l, acc = lax.fori_loop(lo, hi, key_block, init)
        m, l, acc = m.reshape(b, hkv, g, bq), l.reshape(b, hkv, g, bq), acc.reshape(b, hkv, g, bq, d)
        if state is not None:
            acc_buf = lax.dynamic_update_slice_in_dim(acc_buf, acc, i * bq, axis=3)
            return (acc_buf, lax.dynamic_update_slice_in_dim(m_buf, m, i * bq, axis=3),
                    lax.dynamic_update_slice_in_dim(l_buf, l, i * bq, axis=3))
        out_buf, lse_buf = carry
        out_blk, lse_blk = _normalise(acc, m, l)  # [B, Hkv, G, bq, D], [B, Hkv, G, bq]
        out_blk = token_major(out_blk).astype(out_buf.dtype)  # [B, bq, Hkv, G, D], like q: out_buf is the output
        out_buf = lax.dynamic_update_slice_in_dim(out_buf, out_blk, i * bq, axis=1)
        lse_buf = lax.dynamic_update_slice_in_dim(lse_buf, lse_blk, i * bq, axis=3)
        return out_buf, lse_buf

    if state is not None:
        return lax.fori_loop(0, nq, query_block, tuple(state))
    out = zeros_like_in_loop(q)
    lse = zeros_like_in_loop(q, (b, hkv, g, tq), jnp.float32)
    return lax.fori_loop(0, nq, query_block, (out, lse))


def _lse(m, l):
    """lse = m + log l from the running row max and sum; -inf for rows that saw nothing (l = 0)."""
    return jnp.where(l == 0.0, -jnp.inf, m + jnp.log(jnp.where(l == 0.0, 1.0, l)))


def _normalise(acc, m, l):
    """Block statistics acc [B, Hkv, G, bq, D], m/l [B, Hkv, G, bq] -> (acc / l, lse); 0 where nothing seen."""
    return acc / jnp.where(l == 0.0, 1.0, l)[..., None], _lse(m, l)


def init_state(q):
    """Empty running statistics for queries q [B, Tq, Hkv, G, D]: acc [B, Hkv, G, Tq, D] f32 (unnormalised
    output, head-major like the kernel's blocks), m (running row max, -inf) and l (running row sum, 0), both
    [B, Hkv, G, Tq] f32."""
    b, tq, hkv, g, d = q.shape
    return (zeros_like_in_loop(q, (b, hkv, g, tq, d), jnp.float32), jnp.full((b, hkv, g, tq), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g, tq), jnp.float32))


def finish_state(state, dtype):
    """Running statistics -> out [B, Tq, Hkv, G, D] in dtype and lse [B, Hkv, G, Tq] f32."""
    acc, m, l = state
    out, lse = _normalise(acc, m, l)
    return token_major(out).astype(dtype), lse


# ----------------------------------------------------------------------------------------------------------
# Backward of one (query chunk, key chunk) pair (FlashAttention-2 style: recompute scores from lse)
# ----------------------------------------------------------------------------------------------------------

def softmax_delta(out, d_out):
    """delta_i = rowsum(dO_i * O_i), the softmax-Jacobian term: [B, Tq, Hkv, G, D] x2 -> [B, Hkv, G, Tq] f32.

    Computed once from the final output (not per chunk): the backward of every chunk uses the same delta."""
    # A token-major einsum, moved to head-major afterwards. On XLA:CPU (jax 0.10, T=8192, 8 heads) this is 0.9 ms;
    # the same einsum written straight to [B, Hkv, G, Tq] is 50 ms, and jnp.sum(d_out * out, -1) is 49 ms (it
    # becomes a YNN reduce fusion, slow for a length-64 minor axis).
    delta = jnp.einsum("bthgd,bthgd->bthg", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [B, Tq, Hkv, G]
    return jnp.moveaxis(delta, 1, -1)


def chunk_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, delta, d_out, *, causal: bool, bq: int, bk: int,
                   sorted_positions: bool = False, grads=None, dropout=None):
    """Gradients of one chunk pair given the final lse [B, Hkv, G, Tq] and delta [B, Hkv, G, Tq].

    Shapes as `chunk_forward`; d_out [B, Tq, Hkv, G, D]. lse is the log-sum-exp over *all* keys the queries see
    (in ring attention: over every chunk), -inf for rows that see nothing. Returns dq [B, Tq, Hkv, G, D],
    dk, dv [B, Tk, Hkv, D], all float32. grads: optional (dq, dk, dv) f32 to add to, so a caller summing
    several chunks (ring attention) needs no second set of buffers. dropout: as `chunk_forward`; the keep mask
    of every block is regenerated from the same key and global positions, never stored.
    """
    b, tq, hkv, g, d = q.shape
    tk = k.shape[1]
    nq, nk = tq // bq, tk // bk
    scale = 1.0 / (d ** 0.5)
    ranges = block_ranges(q_pos, k_pos, q_seg, k_seg, bq, bk)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that see nothing: exp(s - inf) = 0, never NaN
    r = g * bq  # rows of a query block (see `_query_rows`)

    def key_block(j, carry):
        dq_buf, dk_buf, dv_buf = carry  # f32 [B, Tq, Hkv, G, D], [B, Tk, Hkv, D] x2
        k_blk, v_blk = _slice(k, j * bk, bk), _slice(v, j * bk, bk)  # [B, bk, Hkv, D]
        k_blk, kt_blk, vt_blk = head_major(k_blk), feature_major(k_blk), feature_major(v_blk)
        kp, ks = _slice(k_pos, j * bk, bk), _slice(k_seg, j * bk, bk)

        def query_block(i, state):
            dq_acc, dk_acc, dv_acc = state  # dq_acc [B, Tq, Hkv, G, D]; dk/dv_acc: dK^T, dV^T [B, Hkv, D, bk]
            # Only block-sized values go through _run_block's lax.switch: with the full-length dq buffer in the
            # switch's operands XLA copies it (one more [B, T, H, D] array whenever segment ids are given).
            dq_zero = jnp.zeros((b, hkv, r, d), jnp.float32)
            dq_blk, dk_acc, dv_acc = _run_block(lambda st, masked: update(i, st, masked),
                                                (dq_zero, dk_acc, dv_acc), i, j, ranges, causal)
            dq_blk = token_major(dq_blk.reshape(b, hkv, g, bq, d))  # [B, bq, Hkv, G, D]
            dq_acc = lax.dynamic_update_slice_in_dim(dq_acc, _slice(dq_acc, i * bq, bq) + dq_blk, i * bq, axis=1)
            return dq_acc, dk_acc, dv_acc

        def update(i, state, masked):
            _, dk_acc, dv_acc = state  # the block's dQ [B, Hkv, R, D] starts at zero
            q_tok, do_tok = _slice(q, i * bq, bq), _slice(d_out, i * bq, bq)  # [B, bq, Hkv, G, D]
            rows, cols = (b, hkv, r, d), (b, hkv, d, r)  # each in both GEMM layouts
            q_blk = head_major(q_tok).reshape(rows) * jnp.asarray(scale, q.dtype)
            qt_blk = feature_major(q_tok).reshape(cols)  # unscaled
            do_blk, dot_blk = head_major(do_tok).reshape(rows), feature_major(do_tok).reshape(cols)
            lse_blk, delta_blk = (_slice(x, i * bq, bq, axis=3).reshape(b, hkv, r) for x in (lse, delta))
            qp, qs = (_query_rows(_slice(x, i * bq, bq), g) for x in (q_pos, q_seg))
            s = _masked_scores(q_blk, kt_blk, qp if causal else None, kp, qs, ks, masked)  # [B, Hkv, R, bk]
            p = jnp.exp(s - lse_blk[..., None])  # exact softmax probabilities of this block
            # With dropout O = (P * Z) V, Z = keep / (1 - rate): dV = (P * Z)^T dO and dP = Z * (dO V^T); the
            # softmax term rowsum(P * dP) is still rowsum(dO * O) = delta.
            z = None if dropout is None else _dropout_factor(dropout, _slice(q_pos, i * bq, bq), kp, b, hkv, g)
            z = None if z is None else z.reshape(p.shape)
            dv_acc = dv_acc + jnp.einsum("bhdr,bhrk->bhdk", dot_blk, _times(p, z).astype(do_blk.dtype),
                                         preferred_element_type=jnp.float32)  # dV^T = dO^T P
            dp = _times(jnp.einsum("bhrd,bhdk->bhrk", do_blk, vt_blk, preferred_element_type=jnp.float32), z)
            ds = p * (dp - delta_blk[..., None])  # [B, Hkv, R, bk]
            ds_in = ds.astype(q.dtype)
            dq_blk = jnp.einsum("bhrk,bhkd->bhrd", ds_in, k_blk, preferred_element_type=jnp.float32) * scale
            # dK^T = scale * Q^T dS; qt_blk is unscaled, so the scale is applied once per key block (below).
            dk_acc = dk_acc + jnp.einsum("bhdr,bhrk->bhdk", qt_blk, ds_in, preferred_element_type=jnp.float32)
            return dq_blk, dk_acc, dv_acc

        dk_acc = dv_acc = jnp.zeros((b, hkv, d, bk), jnp.float32)  # this chunk's dK^T (unscaled), dV^T of block j
        lo, hi = _visible_range(ranges, j, nq, over_keys=False) if causal and sorted_positions else (0, nq)
        dq_buf, dk_acc, dv_acc = lax.fori_loop(lo, hi, query_block, (dq_buf, dk_acc, dv_acc))
        dk_buf = lax.dynamic_update_slice_in_dim(
            dk_buf, _slice(dk_buf, j * bk, bk) + from_feature_major(dk_acc * scale), j * bk, axis=1)
        dv_buf = lax.dynamic_update_slice_in_dim(
            dv_buf, _slice(dv_buf, j * bk, bk) + from_feature_major(dv_acc), j * bk, axis=1)
        return dq_buf, dk_buf, dv_buf

    if grads is None:  # the buffers are token-major like q, k, v: they are the outputs, no full-length copy
        grads = (zeros_like_in_loop(d_out, q.shape, jnp.float32), zeros_like_in_loop(d_out, k.shape, jnp.float32),
                 zeros_like_in_loop(d_out, v.shape, jnp.float32))
    return lax.fori_loop(0, nk, key_block, tuple(grads))


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring for one device
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(q, k, v, q_pos, k_pos, q_seg, k_seg, words, causal, bq, bk, rate):
    return _attention_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, words, causal, bq, bk, rate)[0]


def _attention_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, words, causal, bq, bk, rate):
    out, lse = chunk_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal, bq=bq, bk=bk,
                             sorted_positions=True, dropout=_dropout(words, rate))
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, words, out, lse)


def _attention_bwd(causal, bq, bk, rate, residuals, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, words, out, lse = residuals
    dq, dk, dv = chunk_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, softmax_delta(out, d_out), d_out,
                                causal=causal, bq=bq, bk=bk, sorted_positions=True, dropout=_dropout(words, rate))
    # positions, segment ids and the dropout key are integers: no cotangent
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
