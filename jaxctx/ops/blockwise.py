"""Blockwise (memory-efficient) attention in pure JAX, for any backend.

Forward: queries and keys are cut into blocks; for each query block the key blocks are visited with a running
row max `m` and row sum `l` (the online softmax of Milakov & Gimelshein 2018, as used by Rabe & Staats 2021,
"Self-attention does not need O(n^2) memory", and FlashAttention, Dao et al. 2022). Only the output and the
per-row log-sum-exp `lse = m + log(l)` are kept for the backward pass.

Backward: a `jax.custom_vjp` recomputes each score block from q, k and `lse` (FlashAttention-2, Dao 2023,
Algorithm 2): the outer loop walks key blocks and accumulates dK, dV in registers-of-the-loop; dQ is accumulated
into one [B, T, H, D] buffer. Nothing T x T is ever stored, so memory is O(T * block) in forward and backward.
(Plain autodiff through a blockwise forward would store every block's probabilities: O(T^2) again.)

Causal masking skips key blocks that lie entirely after a query block instead of computing and masking them,
so causal attention costs about half of full attention. Blocks that straddle the diagonal are masked; blocks
entirely before it run without any mask work unless segment ids are given.

Numerics: scores, running statistics and accumulators are float32 whatever the input dtype. Masked scores are
-inf; a row whose visible keys are all masked so far keeps m = -inf and contributes zeros (never NaN), and a row
with no visible key at all returns 0 and has lse = +inf so its backward probabilities are exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxctx.ops.buffers import zeros_like_in_loop

DEFAULT_BLOCK = 512  # large blocks amortise loop overhead; a [B, H, 512, 512] f32 tile is 1 MiB per head
# Sentinel segment ids for padded rows: padded keys match nothing, padded queries (discarded) match nothing.
_PAD_KEY_SEGMENT = jnp.iinfo(jnp.int32).min
_PAD_QUERY_SEGMENT = jnp.iinfo(jnp.int32).min + 1


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_block(requested: int | None, t: int) -> int:
    """Block size actually used for a sequence of length t: the request (or DEFAULT_BLOCK), never much above t."""
    if requested is not None and (not isinstance(requested, int) or requested <= 0):
        raise ValueError(f"attention block size must be a positive integer, got {requested!r}")
    block = DEFAULT_BLOCK if requested is None else requested
    return min(block, _round_up(t, 8))


def blockwise_attention(q, k, v, *, causal: bool = False, segment_ids=None, block_q: int | None = None,
                        block_k: int | None = None):
    """Attention with O(T * block) memory in forward and backward.

    q [B, T, H, D]; k, v [B, T, Hkv, D], H % Hkv == 0; segment_ids optional int [B, T]. Any T works: inputs are
    padded up to a multiple of the block sizes and the padding is masked out. Returns [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    bq, bk = pick_block(block_q, t), pick_block(block_k, t)
    tq, tk = _round_up(t, bq), _round_up(t, bk)
    if segment_ids is None and tk != t and not causal:
        # Padded keys must be hidden; under causal masking they already are (they sit after every real query).
        segment_ids = jnp.zeros((b, t), jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        q_seg = jnp.pad(segment_ids, ((0, 0), (0, tq - t)), constant_values=_PAD_QUERY_SEGMENT)
        k_seg = jnp.pad(segment_ids, ((0, 0), (0, tk - t)), constant_values=_PAD_KEY_SEGMENT)
    else:
        q_seg = k_seg = None
    # GQA without repeating k/v: query heads are viewed as [Hkv, G] so each k/v head serves G query heads.
    qg = q.reshape(b, t, hkv, h // hkv, d)  # [B, T, Hkv, G, D]
    qg = jnp.pad(qg, ((0, 0), (0, tq - t), (0, 0), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, tk - t), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, tk - t), (0, 0), (0, 0)))
    out = _attention(qg, kp, vp, q_seg, k_seg, causal, bq, bk)  # [B, Tq, Hkv, G, D]
    return out[:, :t].reshape(b, t, h, d)


# ----------------------------------------------------------------------------------------------------------
# Block helpers shared by forward and backward
# ----------------------------------------------------------------------------------------------------------

def _block_mask(i, j, bq, bk, q_seg, k_seg, causal):
    """[B or 1, 1, 1, bq, bk] visibility of key block j from query block i (None if everything is visible)."""
    mask = None
    if causal:
        q_pos = i * bq + lax.iota(jnp.int32, bq)
        k_pos = j * bk + lax.iota(jnp.int32, bk)
        mask = (q_pos[:, None] >= k_pos[None, :])[None, None, None]  # [1, 1, 1, bq, bk]
    if q_seg is not None:
        qs = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)  # [B, bq]
        ks = lax.dynamic_slice_in_dim(k_seg, j * bk, bk, axis=1)  # [B, bk]
        same = (qs[:, :, None] == ks[:, None, :])[:, None, None]  # [B, 1, 1, bq, bk]
        mask = same if mask is None else mask & same
    return mask


def _masked_scores(q_blk, k_blk, i, j, bq, bk, q_seg, k_seg, causal):
    """Scores of query block i against key block j, -inf where not visible.

    [B, bq, Hkv, G, D] x [B, bk, Hkv, D] -> [B, Hkv, G, bq, bk] float32 (q already scaled). `causal` is True only
    for blocks straddling the diagonal; blocks wholly before it need no mask unless segment ids are given.
    """
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    mask = _block_mask(i, j, bq, bk, q_seg, k_seg, causal)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _segment_ranges(q_seg, k_seg, bq, bk):
    """Per-block (min, max) segment ids: [B, nq] x2 for queries, [B, nk] x2 for keys; None without segments."""
    if q_seg is None:
        return None
    b = q_seg.shape[0]
    qs, ks = q_seg.reshape(b, -1, bq), k_seg.reshape(b, -1, bk)
    return qs.min(-1), qs.max(-1), ks.min(-1), ks.max(-1)


def _run_block(update, state, i, j, ranges):
    """Apply `update(state, segment_mask)` for block (i, j), using the segment ids to do less work.

    Packed documents make most blocks trivial: if no query of block i can share a segment with a key of block j
    (their id ranges are disjoint in every row) the block is skipped; if both blocks lie inside one segment in
    every row, no segment mask is built. Only blocks that straddle a document boundary pay for the mask. The
    range tests are exact for any ids: disjoint ranges cannot hold equal ids, equal one-value ranges are equal.
    """
    if ranges is None:
        return update(state, False)
    q_lo, q_hi, k_lo, k_hi = (r[:, idx] for r, idx in zip(ranges, (i, i, j, j)))  # [B] each
    disjoint = jnp.all((q_hi < k_lo) | (k_hi < q_lo))
    uniform = jnp.all((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo))
    kind = jnp.where(disjoint, 0, jnp.where(uniform, 1, 2))
    return lax.switch(kind, [lambda st: st, lambda st: update(st, False), lambda st: update(st, True)], state)


def _causal_ranges(i_or_j, bq, bk, n_other, *, over_keys: bool):
    """Loop bounds under causal masking.

    over_keys=True (forward; i = query block): key blocks [0, n_full) are entirely at or before every query of
    block i (no mask needed), [n_full, n_vis) straddle the diagonal (masked); later blocks are skipped.
    over_keys=False (backward; j = key block): query blocks [lo, lo_full) straddle (masked), [lo_full, n_other)
    see all of key block j; earlier query blocks are skipped.
    """
    if over_keys:
        i = i_or_j
        n_full = jnp.minimum((i * bq + 1) // bk, n_other)  # last key of block j <= first query of block i
        n_vis = jnp.minimum(((i + 1) * bq - 1) // bk + 1, n_other)  # first key of block j <= last query
        return n_full, n_vis
    j = i_or_j
    lo = (j * bk) // bq  # first query block whose last query reaches key block j
    lo_full = jnp.minimum(-(-((j + 1) * bk - 1) // bq), n_other)  # first query block past the diagonal
    return lo, lo_full


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------

def _forward(q, k, v, q_seg, k_seg, causal, bq, bk):
    """q [B, Tq, Hkv, G, D], k/v [B, Tk, Hkv, D] -> out [B, Tq, Hkv, G, D] (q dtype), lse [B, Hkv, G, Tq] f32."""
    b, tq, hkv, g, d = q.shape
    nq, nk = tq // bq, k.shape[1] // bk
    scale = 1.0 / (d ** 0.5)
    ranges = _segment_ranges(q_seg, k_seg, bq, bk)

    def query_block(i, carry):
        out_buf, lse_buf = carry
        q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1) * jnp.asarray(scale, q.dtype)

        def key_block(j, state, masked):
            return _run_block(lambda st, segs: update(j, st, masked, segs), state, i, j, ranges)

        def update(j, state, masked, segs):
            m, l, acc = state  # [B, Hkv, G, bq], [B, Hkv, G, bq], [B, Hkv, G, bq, D]
            k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            s = _masked_scores(q_blk, k_blk, i, j, bq, bk, q_seg if segs else None, k_seg,
                               causal and masked)  # [B, Hkv, G, bq, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet: exp(-inf) = 0
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return m_new, l, acc

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, d), jnp.float32))
        if causal:
            n_full, n_vis = _causal_ranges(i, bq, bk, nk, over_keys=True)
            state = lax.fori_loop(0, n_full, functools.partial(key_block, masked=False), init)
            state = lax.fori_loop(n_full, n_vis, functools.partial(key_block, masked=True), state)
        else:
            state = lax.fori_loop(0, nk, functools.partial(key_block, masked=False), init)
        m, l, acc = state
        empty = l == 0.0
        out_blk = acc / jnp.where(empty, 1.0, l)[..., None]  # [B, Hkv, G, bq, D]
        lse_blk = jnp.where(empty, jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(jnp.where(empty, 1.0, l)))
        out_blk = jnp.transpose(out_blk, (0, 3, 1, 2, 4)).astype(q.dtype)  # [B, bq, Hkv, G, D]
        out_buf = lax.dynamic_update_slice_in_dim(out_buf, out_blk, i * bq, axis=1)
        lse_buf = lax.dynamic_update_slice_in_dim(lse_buf, lse_blk, i * bq, axis=3)
        return out_buf, lse_buf

    out = zeros_like_in_loop(q)
    lse = zeros_like_in_loop(q, (b, hkv, g, tq), jnp.float32)
    return lax.fori_loop(0, nq, query_block, (out, lse))


# ----------------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2 style: recompute scores block by block from lse)
# ----------------------------------------------------------------------------------------------------------

def _backward(q, k, v, q_seg, k_seg, out, lse, d_out, causal, bq, bk):
    b, tq, hkv, g, d = q.shape
    tk = k.shape[1]
    nq, nk = tq // bq, tk // bk
    scale = 1.0 / (d ** 0.5)
    ranges = _segment_ranges(q_seg, k_seg, bq, bk)
    # delta_i = rowsum(dO_i * O_i): the softmax-Jacobian term, [B, Hkv, G, Tq]
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(j, carry):
        dq_buf, dk_buf, dv_buf = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)  # [B, bk, Hkv, D]
        v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)

        def query_block(i, state, masked):
            dq_acc, dk_acc, dv_acc = state  # dq_acc [B, Tq, Hkv, G, D]; dk/dv_acc [B, Hkv, bk, D]
            # Only block-sized values go through _run_block's lax.switch: with the full-length dq buffer in the
            # switch's operands XLA copies it (one more [B, T, H, D] array whenever segment ids are given).
            dq_zero = jnp.zeros((b, bq) + q.shape[2:], jnp.float32)
            dq_blk, dk_acc, dv_acc = _run_block(lambda st, segs: update(i, st, masked, segs),
                                                (dq_zero, dk_acc, dv_acc), i, j, ranges)
            dq_acc = lax.dynamic_update_slice_in_dim(
                dq_acc, lax.dynamic_slice_in_dim(dq_acc, i * bq, bq, axis=1) + dq_blk, i * bq, axis=1)
            return dq_acc, dk_acc, dv_acc

        def update(i, state, masked, segs):
            _, dk_acc, dv_acc = state  # the block's dQ [B, bq, Hkv, G, D] starts at zero
            q_blk = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1) * jnp.asarray(scale, q.dtype)
            do_blk = lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)  # [B, bq, Hkv, G, D]
            lse_blk = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)  # [B, Hkv, G, bq]
            delta_blk = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
            s = _masked_scores(q_blk, k_blk, i, j, bq, bk, q_seg if segs else None, k_seg,
                               causal and masked)  # [B, Hkv, G, bq, bk]
            p = jnp.exp(s - lse_blk[..., None])  # exact softmax probabilities of this block
            dv_acc = dv_acc + jnp.einsum("bhgqk,bqhgd->bhkd", p.astype(do_blk.dtype), do_blk,
                                         preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])  # [B, Hkv, G, bq, bk]
            ds_in = ds.astype(q.dtype)
            dq_blk = jnp.einsum("bhgqk,bkhd->bqhgd", ds_in, k_blk, preferred_element_type=jnp.float32) * scale
            # q_blk already carries the 1/sqrt(d) scale, so this is dK = scale * dS^T Q.
            dk_acc = dk_acc + jnp.einsum("bhgqk,bqhgd->bhkd", ds_in, q_blk, preferred_element_type=jnp.float32)
            return dq_blk, dk_acc, dv_acc

        zeros_kv = jnp.zeros((b, hkv, bk, d), jnp.float32)
        state = (dq_buf, zeros_kv, zeros_kv)
        if causal:
            lo, lo_full = _causal_ranges(j, bq, bk, nq, over_keys=False)
            state = lax.fori_loop(lo, lo_full, functools.partial(query_block, masked=True), state)
            state = lax.fori_loop(lo_full, nq, functools.partial(query_block, masked=False), state)
        else:
            state = lax.fori_loop(0, nq, functools.partial(query_block, masked=False), state)
        dq_buf, dk_acc, dv_acc = state
        dk_buf = lax.dynamic_update_slice_in_dim(dk_buf, jnp.transpose(dk_acc, (0, 2, 1, 3)), j * bk, axis=1)
        dv_buf = lax.dynamic_update_slice_in_dim(dv_buf, jnp.transpose(dv_acc, (0, 2, 1, 3)), j * bk, axis=1)
        return dq_buf, dk_buf, dv_buf

    init = (zeros_like_in_loop(d_out, q.shape, jnp.float32), zeros_like_in_loop(d_out, k.shape, jnp.float32),
            zeros_like_in_loop(d_out, v.shape, jnp.float32))
    dq, dk, dv = lax.fori_loop(0, nk, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_seg, k_seg, causal, bq, bk):
    out, _ = _forward(q, k, v, q_seg, k_seg, causal, bq, bk)
    return out


def _attention_fwd(q, k, v, q_seg, k_seg, causal, bq, bk):
    out, lse = _forward(q, k, v, q_seg, k_seg, causal, bq, bk)
    return out, (q, k, v, q_seg, k_seg, out, lse)


def _attention_bwd(causal, bq, bk, residuals, d_out):
    q, k, v, q_seg, k_seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_seg, k_seg, out, lse, d_out, causal, bq, bk)
    return dq, dk, dv, None, None  # segment ids are integers: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
