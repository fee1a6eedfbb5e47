"""Blockwise feed-forward and chunked cross-entropy against their unchunked references (values and gradients),
plus a structural check that the chunked versions never build the full [B, T, F] / [B, T, V] array."""

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops import blockwise_feedforward, chunked_cross_entropy, cross_entropy, project_logits


# Tests check numbers, not speed: XLA's backend optimisation level 0 halves CPU compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, T, D, F, V = 2, 13, 8, 32, 48  # T deliberately not a multiple of any chunk used below


def _mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {"wi": jax.random.normal(k1, (D, F)) * 0.3, "bi": jnp.linspace(-1, 1, F),
            "wo": jax.random.normal(k2, (F, D)) * 0.3}


def _mlp(params, x):
    return jax.nn.gelu(x @ params["wi"] + params["bi"]) @ params["wo"]


def _largest_intermediate(fn, *args) -> int:
    """Number of elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""
    def walk(jaxpr):
        best = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                best = max(best, walk(sub))
        return best
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("chunk", [0, 5, 64])
def test_blockwise_feedforward_matches_whole_sequence(chunk):
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, T, D))

    def loss(params, x, chunked):
        fn = lambda h: _mlp(params, h)  # noqa: E731
        y = blockwise_feedforward(fn, x, chunk=chunk) if chunked else fn(x)
        return jnp.sum(jnp.sin(y)), y

    value_and_grad = jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (val, y), grads = value_and_grad(params, x, True)
    (ref_val, ref_y), ref_grads = value_and_grad(params, x, False)
    assert y.shape == (B, T, D)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, ref_grads)


def test_blockwise_feedforward_never_holds_full_intermediate():
    params = _mlp_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    grad = jax.grad(lambda p, x: jnp.sum(blockwise_feedforward(lambda h: _mlp(p, h), x, chunk=4)), argnums=(0, 1))
    assert _largest_intermediate(grad, params, x) < B * T * F  # only [B, 4, F] chunks (and the [D, F] grads)
    whole = jax.grad(lambda p, x: jnp.sum(_mlp(p, x)), argnums=(0, 1))
    assert _largest_intermediate(whole, params, x) >= B * T * F  # the check does see the unchunked intermediate


def _loss_inputs(layout, with_bias):
    keys = jax.random.split(jax.random.key(2), 4)
    hidden = jax.random.normal(keys[0], (B, T, D))
    head = jax.random.normal(keys[1], (D, V) if layout == "dv" else (V, D)) * 0.5
    bias = jax.random.normal(keys[2], (V,)) if with_bias else None
    targets = jax.random.randint(keys[3], (B, T), 0, V)
    weights = (jnp.arange(T) % 3 != 0).astype(jnp.float32)[None].repeat(B, 0)  # some positions ignored
    targets = jnp.where(weights > 0, targets, -100)  # ignored targets may hold anything (HF uses -100)
    return hidden, head, bias, targets, weights


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 100])
def test_chunked_cross_entropy_matches_reference(layout, with_bias, chunk):
    """The hand-written gradient (each chunk's in the forward pass) against autodiff of the unchunked loss."""
    hidden, head, bias, targets, weights = _loss_inputs(layout, with_bias)

    def chunked(h, w, b):
        return chunked_cross_entropy(h, w, b, targets, weights, chunk=chunk, head_layout=layout)

    def reference(h, w, b):
        return cross_entropy(h, w, b, targets, weights, head_layout=layout)

    def value_and_grads(fn):
        return jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(hidden, head, bias)

    (loss, wsum), grads = value_and_grads(lambda *a: chunked(*a))
    (ref_loss, ref_wsum), ref_grads = value_and_grads(lambda *a: reference(*a))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(wsum, ref_wsum)
    np.testing.assert_allclose(wsum, float(jnp.sum(weights)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)


def test_cross_entropy_matches_log_softmax_definition():
    hidden, head, bias, targets, weights = _loss_inputs("dv", True)
    logp = jax.nn.log_softmax(np.asarray(hidden) @ np.asarray(head) + np.asarray(bias), axis=-1)
    safe = np.where(np.asarray(weights) > 0, np.asarray(targets), 0)
    expected = -np.sum(np.take_along_axis(np.asarray(logp), safe[..., None], -1)[..., 0] * np.asarray(weights))
    np.testing.assert_allclose(cross_entropy(hidden, head, bias, targets, weights)[0], expected, rtol=1e-5)


def test_chunked_cross_entropy_never_holds_full_logits():
    hidden, head, bias, targets, weights = _loss_inputs("vd", True)
    grad = jax.grad(lambda h, w: chunked_cross_entropy(h, w, bias, targets, weights, chunk=4,
                                                       head_layout="vd")[0], argnums=(0, 1))
    assert _largest_intermediate(grad, hidden, head) < B * T * V
    whole = jax.grad(lambda h, w: cross_entropy(h, w, bias, targets, weights, head_layout="vd")[0], argnums=(0, 1))
    assert _largest_intermediate(whole, hidden, head) >= B * T * V


def test_bf16_hidden_gives_f32_logits_and_loss():
    hidden, head, bias, targets, weights = _loss_inputs("dv", True)
    logits = project_logits(hidden.astype(jnp.bfloat16), head, bias)
    assert logits.dtype == jnp.float32
    loss, _ = chunked_cross_entropy(hidden.astype(jnp.bfloat16), head, bias, targets, weights, chunk=5)
    ref, _ = cross_entropy(hidden, head, bias, targets, weights)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=2e-2)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_bf16_hidden_gradients_match_f32_reference(layout):
    hidden, head, bias, targets, weights = _loss_inputs(layout, True)
    grad_args = (0, 1, 2)
    got = jax.grad(lambda h, w, b: chunked_cross_entropy(h, w, b, targets, weights, chunk=5, head_layout=layout)[0],
                   argnums=grad_args)(hidden.astype(jnp.bfloat16), head, bias)
    want = jax.grad(lambda h, w, b: cross_entropy(h, w, b, targets, weights, head_layout=layout)[0],
                    argnums=grad_args)(hidden, head, bias)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.05 * float(jnp.abs(w).max()))


def _transposed_copy_sizes(hlo_text: str) -> list[int]:
    """Element counts of every transpose / copy instruction in a compiled HLO module (fusion bodies included)."""
    sizes = []
    for match in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} (?:transpose|copy)\(", hlo_text):
        sizes.append(int(np.prod([int(d) for d in match.group(1).split(",") if d] or [1])))
    return sizes


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_chunked_loss_gradient_never_transposes_a_logits_tile(layout):
    """Autodiff's head gradient (dlogits^T h) made XLA:CPU copy every [B, C, V] tile transposed; the written-out
    gradient accumulates h^T dlogits instead, so no transpose or copy is as large as a tile."""
    hidden, head, bias, targets, weights = _loss_inputs(layout, True)
    chunk = 8
    grad = jax.jit(jax.grad(lambda h, w, b: chunked_cross_entropy(h, w, b, targets, weights, chunk=chunk,
                                                                    head_layout=layout)[0], argnums=(0, 1, 2)))
    sizes = _transposed_copy_sizes(grad.lower(hidden, head, bias).compile().as_text())
    assert max(sizes, default=0) < B * chunk * V, sizes
    # the check can see such a copy: autodiff of the unchunked loss has one
    whole = jax.jit(jax.grad(lambda h, w: cross_entropy(h, w, bias, targets, weights, head_layout=layout)[0],
                             argnums=(0, 1)))
    assert max(_transposed_copy_sizes(whole.lower(hidden, head).compile().as_text())) >= B * T * V


def test_bad_arguments_raise_value_error():
    hidden, head, bias, targets, weights = _loss_inputs("dv", False)
    with pytest.raises(ValueError, match="head_layout"):
        cross_entropy(hidden, head, bias, targets, weights, head_layout="xy")
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(hidden, head, bias, targets, weights, chunk=-1)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, head, bias, targets[:, :5], weights, chunk=4)
