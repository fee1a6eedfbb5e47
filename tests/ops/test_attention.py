"""Attention kernels against the materialised reference: outputs and gradients, masks, GQA, odd lengths."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops import attention
from jaxctx.ops.reference import reference_attention


def _inputs(seed, b, t, h, hkv, d, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, t, hkv, d), dtype)
    v = jax.random.normal(kv, (b, t, hkv, d), dtype)
    cotangent = jax.random.normal(kc, (b, t, h, d), jnp.float32)
    return q, k, v, cotangent


def _packed_segments(seed, b, t, n_docs=4, pad=5):
    """Contiguous documents 1..n_docs of random lengths, then `pad` padding tokens with segment id 0."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - pad), size=n_docs - 1, replace=False))
        bounds = [0, *cuts, t - pad]
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[row, lo:hi] = doc
    return jnp.asarray(seg)


def _value_and_grads(impl, q, k, v, cotangent, **kw):
    """Output and the gradients of <output, cotangent> w.r.t. q, k, v, compiled as one program."""
    segment_ids = kw.pop("segment_ids", None)

    # Unoptimised LLVM code generation halves compile time, which dominates these tiny cases.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(q, k, v, cotangent, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl=impl, segment_ids=segment_ids, **kw), q, k, v)
        return out, vjp(cotangent.astype(out.dtype))

    return run(q, k, v, cotangent, segment_ids)


def _assert_close(got, want, tol):
    got_out, got_grads = got
    want_out, want_grads = want
    np.testing.assert_allclose(got_out, want_out, atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f"d{name}")


CASES = [
    # (b, t, h, hkv, d, block_q, block_k)
    (2, 64, 4, 4, 16, 16, 16),  # T a multiple of equal blocks
    (2, 37, 4, 2, 8, 8, 16),  # T not a multiple of either block, GQA 2:1
    (1, 50, 6, 3, 8, 32, 8),  # block_q > block_k, GQA, odd T
    (1, 45, 8, 1, 16, 8, 32),  # block_q < block_k, multi-query attention
    (1, 96, 2, 2, 32, None, None),  # default blocks (one block covers T)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}t{}h{}kv{}d{}_bq{}bk{}".format(*c))
@pytest.mark.parametrize("causal,segments", list(itertools.product([False, True], [False, True])))
def test_blockwise_matches_reference(case, causal, segments):
    b, t, h, hkv, d, bq, bk = case
    q, k, v, ct = _inputs(0, b, t, h, hkv, d)
    seg = _packed_segments(1, b, t) if segments else None
    want = _value_and_grads("reference", q, k, v, ct, causal=causal, segment_ids=seg)
    got = _value_and_grads("blockwise", q, k, v, ct, causal=causal, segment_ids=seg, block_q=bq, block_k=bk)
    _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_xla_matches_reference(causal):
    q, k, v, ct = _inputs(2, 2, 40, 4, 2, 16)
    seg = _packed_segments(3, 2, 40)
    want = _value_and_grads("reference", q, k, v, ct, causal=causal, segment_ids=seg)
    got = _value_and_grads("xla", q, k, v, ct, causal=causal, segment_ids=seg)
    _assert_close(got, want, 1e-5)


def test_reference_matches_naive_softmax():
    """The oracle itself against a direct per-head numpy computation (causal + segments, GQA)."""
    b, t, h, hkv, d = 1, 12, 4, 2, 8
    q, k, v, _ = _inputs(4, b, t, h, hkv, d)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
    out = np.asarray(reference_attention(q, k, v, causal=True, segment_ids=seg))
    qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, seg))
    for head in range(h):
        kvh = head // (h // hkv)
        for i in range(t):
            keys = [j for j in range(i + 1) if sn[0, j] == sn[0, i]]
            scores = np.array([qn[0, i, head] @ kn[0, j, kvh] for j in keys]) / np.sqrt(d)
            w = np.exp(scores - scores.max())
            w /= w.sum()
            want = sum(wj * vn[0, j, kvh] for wj, j in zip(w, keys))
            np.testing.assert_allclose(out[0, i, head], want, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_no_visible_key_in_a_block_are_finite(causal):
    """Blocks are processed with rows that see none of the block's keys, and other blocks are skipped whole.

    Documents of 3 tokens under blocks of 8: neighbouring blocks share one document at their border, so they are
    processed (masked) while most of their rows see no key in them; blocks further apart hold disjoint
    documents and are skipped by the segment-range test. Neither may produce NaN or change the result.
    """
    b, t, h, d = 2, 40, 2, 8
    q, k, v, ct = _inputs(5, b, t, h, h, d)
    seg = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // 3 + 1, (b, t))
    got = _value_and_grads("blockwise", q, k, v, ct, causal=causal, segment_ids=seg, block_q=8, block_k=8)
    want = _value_and_grads("reference", q, k, v, ct, causal=causal, segment_ids=seg)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (got[0], *got[1]))
    _assert_close(got, want, 1e-5)


def test_segment_ranges_differ_across_batch_rows():
    """A block may be skipped or left unmasked only if that holds in every row of the batch."""
    q, k, v, ct = _inputs(6, 2, 32, 2, 2, 8)
    one_doc = jnp.ones((32,), jnp.int32)
    four_docs = jnp.arange(32, dtype=jnp.int32) // 8 + 1  # one document per block of 8
    seg = jnp.stack([one_doc, four_docs])
    _assert_close(_value_and_grads("blockwise", q, k, v, ct, causal=True, segment_ids=seg, block_q=8, block_k=8),
                  _value_and_grads("reference", q, k, v, ct, causal=True, segment_ids=seg), 1e-5)


def test_padded_keys_are_hidden_without_segments():
    """Non-causal with T not a multiple of the block: the padded key columns are hidden from real queries."""
    q, k, v, ct = _inputs(6, 1, 13, 2, 2, 8)
    _assert_close(_value_and_grads("blockwise", q, k, v, ct, block_q=8, block_k=8),
                  _value_and_grads("reference", q, k, v, ct), 1e-5)


def test_bf16_blockwise_close_to_f32_reference():
    q, k, v, ct = _inputs(7, 1, 64, 4, 2, 32)
    want = reference_attention(q, k, v, causal=True)
    got = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal=True,
                    impl="blockwise", block_q=16, block_k=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_auto_is_blockwise_on_cpu():
    from jaxctx.ops import resolve_impl
    assert jax.default_backend() != "cpu" or resolve_impl("auto") == "blockwise"
    q, k, v, _ = _inputs(8, 1, 20, 2, 2, 8)
    np.testing.assert_allclose(attention(q, k, v, causal=True),
                               reference_attention(q, k, v, causal=True), atol=1e-5)


def test_under_vmap_and_jit():
    q, k, v, _ = _inputs(9, 3, 24, 2, 2, 8)
    fn = jax.jit(jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None], causal=True, impl="blockwise",
                                                    block_q=8, block_k=8)[0]))
    np.testing.assert_allclose(fn(q, k, v), reference_attention(q, k, v, causal=True), atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(q=jnp.zeros((2, 8, 4))), "rank 4"),
    (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))), "divisible"),
    (dict(k=jnp.zeros((2, 9, 2, 16)), v=jnp.zeros((2, 9, 2, 16))), r"\(2, 9, 2, 16\)"),
    (dict(v=jnp.zeros((2, 8, 2, 8))), "same shape"),
    (dict(impl="flash"), "unknown"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), "integer"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "shape"),
    (dict(block_q=0, impl="blockwise"), "positive"),
])
def test_bad_input_raises_value_error(bad, match):
    args = dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 2, 16)), v=jnp.zeros((2, 8, 2, 16)))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **args)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised without a GPU")
def test_cudnn_without_gpu_is_a_clear_error():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="needs a GPU"):
        attention(q, q, q, impl="cudnn")


@pytest.mark.gpu
def test_cudnn_matches_reference_on_gpu():
    q, k, v, ct = _inputs(10, 2, 256, 4, 2, 64, dtype=jnp.bfloat16)
    want = reference_attention(q, k, v, causal=True)
    got = attention(q, k, v, causal=True, impl="cudnn")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


# --- block skipping, observed --------------------------------------------------------------------------------
# XLA's compiled cost_analysis() cannot see skipping: it counts a while-loop body once (not per trip) and a
# lax.switch/cond over all its branches, so causal, packed and full attention report the same FLOPs. Instead every
# matmul the kernel traces is wrapped in a jax.debug.callback that adds its FLOPs to a host counter when it
# *executes*: a skipped block (a switch branch not taken, a loop trip not run) adds nothing. Work outside the block
# pairs is O(T * D) (the backward's rowsum delta = 0.02% here), hence rtol=1e-3; no skipping would be off by 78%+.

def _einsum_flops(subscripts, *operands):
    inputs = subscripts.replace(" ", "").split("->")[0].split(",")
    if "." in subscripts or len(inputs) != len(operands):
        raise AssertionError(f"unexpected einsum {subscripts!r}: teach _einsum_flops about it")
    sizes = {}
    for letters, x in zip(inputs, operands):
        sizes.update(zip(letters, x.shape))
    return 2 * int(np.prod(list(sizes.values())))


def _executed_matmul_flops(monkeypatch, fn, *args):
    """FLOPs of the matmuls `fn(*args)` actually executes (forward and backward), counted at run time."""
    total = []
    einsum, matmul, dot_general = jnp.einsum, jnp.matmul, jax.lax.dot_general

    def count(flops):
        jax.debug.callback(lambda: total.append(flops))

    def counted_einsum(subscripts, *operands, **kw):
        count(_einsum_flops(subscripts, *operands))
        return einsum(subscripts, *operands, **kw)

    def uncounted(name):
        def fail(*a, **kw):
            raise AssertionError(f"the kernel now calls {name}: count its FLOPs in _executed_matmul_flops")
        return fail

    with monkeypatch.context() as m:
        m.setattr(jnp, "einsum", counted_einsum)
        m.setattr(jnp, "matmul", uncounted("jnp.matmul"))
        m.setattr(jax.lax, "dot_general", uncounted("lax.dot_general"))
        jax.block_until_ready(jax.jit(fn)(*args))
        jax.effects_barrier()
    assert einsum is jnp.einsum and matmul is jnp.matmul and dot_general is jax.lax.dot_general
    return sum(total)


def _attention_work(monkeypatch, t, *, causal=False, segment_ids=None, block=64):
    q, k, v, ct = _inputs(0, 1, t, 2, 1, 16)

    def value_and_grads(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                                     impl="blockwise", block_q=block, block_k=block), q, k, v)
        return out, vjp(ct)

    return _executed_matmul_flops(monkeypatch, value_and_grads, q, k, v)


def test_causal_skipping_does_about_half_the_work(monkeypatch):
    t, block = 512, 64  # 8 x 8 block pairs: causal runs the 36 on or below the diagonal
    full = _attention_work(monkeypatch, t, block=block)
    causal = _attention_work(monkeypatch, t, causal=True, block=block)
    n = t // block
    assert full > 0
    np.testing.assert_allclose(causal / full, (n * (n + 1) / 2) / n ** 2, rtol=1e-3)  # 0.5625: ~half


@pytest.mark.parametrize("causal", [False, True])
def test_packed_documents_cost_the_sum_of_their_own_attention(monkeypatch, causal):
    """Four disjoint documents of 128 tokens packed into 512 cost what the four run separately cost (a quarter of
    full attention over 512, non-causal), not what one 512-token sequence costs."""
    doc, n_docs = 128, 4
    seg = jnp.asarray(np.repeat(np.arange(1, n_docs + 1, dtype=np.int32), doc)[None])
    packed = _attention_work(monkeypatch, doc * n_docs, causal=causal, segment_ids=seg)
    alone = _attention_work(monkeypatch, doc, causal=causal)
    np.testing.assert_allclose(packed, n_docs * alone, rtol=1e-3)
    if not causal:
        np.testing.assert_allclose(packed * n_docs, _attention_work(monkeypatch, doc * n_docs), rtol=1e-3)
