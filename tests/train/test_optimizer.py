"""jaxctx.train.optimizer against independent computations: schedule values at chosen steps, the weight-decay
mask of every model family, one step of each optimizer against optax called directly, global-norm clipping at
its threshold, and gradient accumulation through the optimizer step."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from jaxctx import config as config_lib
from jaxctx import models
from jaxctx.config import TrainConfig
from jaxctx.train.optimizer import build_optimizer, decay_mask, learning_rate_schedule
from jaxctx.train.state import create_state
from jaxctx.train.step import make_train_step
from jaxctx.parallel import make_mesh

# Tests here compile the same steps again and again: tests/conftest.py's persistent cache compiles each once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def train_cfg(**kw):
    return dataclasses.replace(TrainConfig(), **kw)


# --- schedules -----------------------------------------------------------------------------------------------
PEAK, WARMUP, STEPS, MIN = 2.0, 10, 110, 0.1  # decay over steps 10..110 (100 steps) down to 0.2


def _cosine(step):  # written out: warmup 0 -> peak, then peak * (min + (1 - min) * (1 + cos(pi * t)) / 2)
    if step < WARMUP:
        return PEAK * step / WARMUP
    t = min(step - WARMUP, STEPS - WARMUP) / (STEPS - WARMUP)
    return PEAK * (MIN + (1 - MIN) * 0.5 * (1 + np.cos(np.pi * t)))


def _linear(step):
    if step < WARMUP:
        return PEAK * step / WARMUP
    t = min(step - WARMUP, STEPS - WARMUP) / (STEPS - WARMUP)
    return PEAK * (1 - (1 - MIN) * t)


@pytest.mark.parametrize("decay,want", [
    ("cosine", _cosine), ("linear", _linear), ("constant", lambda s: PEAK * min(s / WARMUP, 1.0))])
def test_schedule_values(decay, want):
    schedule = learning_rate_schedule(train_cfg(learning_rate=PEAK, warmup_steps=WARMUP, steps=STEPS, decay=decay,
                                                min_lr_ratio=MIN))
    for step in (0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 200):
        np.testing.assert_allclose(float(schedule(step)), want(step), rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    # Fixed points, stated once more as plain numbers: the peak right after warmup, the floor at the end.
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(WARMUP)), PEAK, rtol=1e-6)
    if decay != "constant":
        np.testing.assert_allclose(float(schedule(STEPS)), PEAK * MIN, rtol=1e-6)
        np.testing.assert_allclose(float(schedule(60)), PEAK * 0.55, rtol=1e-6)  # halfway: cosine = linear


def test_schedule_without_warmup_starts_at_the_peak():
    schedule = learning_rate_schedule(train_cfg(learning_rate=PEAK, warmup_steps=0, steps=100, decay="cosine",
                                                min_lr_ratio=0.0))
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 100)], [PEAK, PEAK / 2, 0.0], atol=1e-6)


# --- weight-decay mask ----------------------------------------------------------------------------------------
def _params(family, *extra):
    cfg = config_lib.load(TINY, [f"model.family={family}", "model.num_layers=1", *extra])
    module = models.build(cfg)
    return meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))[
        "params"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_decay_mask_is_kernels_and_embeddings_only(family):
    params = _params(family)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    names = {}
    for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
        name = path[-1].key
        names[jax.tree_util.keystr(path)] = decayed
        want = name == "kernel" or name.endswith("_kernel") or name == "embedding"
        assert decayed is want, f"{jax.tree_util.keystr(path)}: decayed={decayed}"
    # Not vacuous: each family has both kinds, including the token embedding and a norm scale.
    assert names["['token_embed']['embedding']"] and not names["['layers']['attn_norm']['scale']"]
    assert any(names.values()) and not all(names.values())


# --- one step of each optimizer vs optax directly ------------------------------------------------------------
def _toy_params_and_grads():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {"dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[1], (3,))},
              "norm": {"scale": jnp.ones((3,))}, "embed": {"embedding": jax.random.normal(k[2], (5, 4))}}
    grads = jax.tree.map(lambda p, kk: jax.random.normal(kk, p.shape),
                         params, jax.tree.unflatten(jax.tree.structure(params), list(jax.random.split(k[3], 4))))
    return params, grads


HAND_MASK = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}, "embed": {"embedding": True}}


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_one_step_matches_optax(name):
    lr, wd = 1e-2, 0.3
    cfg = train_cfg(optimizer=name, learning_rate=lr, warmup_steps=0, decay="constant", weight_decay=wd,
                    beta1=0.8, beta2=0.9, grad_clip=0.0, steps=10)
    if name == "adamw":
        ref = optax.adamw(lr, b1=0.8, b2=0.9, weight_decay=wd, mask=HAND_MASK)
    elif name == "lion":
        ref = optax.lion(lr, b1=0.8, b2=0.9, weight_decay=wd, mask=HAND_MASK)
    else:
        ref = optax.adafactor(lr, weight_decay_rate=wd, weight_decay_mask=HAND_MASK)
    params, grads = _toy_params_and_grads()
    ours = build_optimizer(cfg)
    p_ours, s_ours, p_ref, s_ref = params, ours.init(params), params, ref.init(params)
    for i in range(2):  # two steps: the second uses the moments the first left
        g = jax.tree.map(lambda x: x * (1 + i), grads)
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_ref)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_ours), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # Decay is really on: with zero gradients only the masked leaves move (AdamW / Lion: p -= lr * wd * p).
    if name != "adafactor":
        zero = jax.tree.map(jnp.zeros_like, grads)
        u, _ = build_optimizer(cfg).update(zero, build_optimizer(cfg).init(params), params)
        for path, x in jax.tree_util.tree_leaves_with_path(u):
            decayed = HAND_MASK[path[0].key][path[1].key]
            p = params[path[0].key][path[1].key]
            np.testing.assert_allclose(x, -lr * wd * p if decayed else 0 * p, rtol=1e-6, atol=1e-8)


# --- clipping --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.5, 0.999, 1.001, 10.0])
def test_global_norm_clipping_at_the_threshold(scale):
    """AdamW's first moment after one step is (1 - b1) * g_clipped: below the threshold g passes unchanged, above
    it is scaled to global norm exactly `grad_clip` (Adam's update itself is scale-invariant, so the moment is
    where clipping is visible)."""
    clip, b1 = 1.0, 0.9
    params, grads = _toy_params_and_grads()
    norm = float(optax.tree.norm(grads))
    grads = jax.tree.map(lambda g: g * (scale * clip / norm), grads)  # global norm = scale * clip
    opt = build_optimizer(train_cfg(optimizer="adamw", grad_clip=clip, beta1=b1, warmup_steps=0, steps=10))
    _, state = opt.update(grads, opt.init(params), params)
    mu = optax.tree.get(state, "mu")
    factor = min(1.0, 1.0 / scale)
    want = jax.tree.map(lambda g: (1 - b1) * g * factor, grads)
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(optax.tree.norm(mu)), (1 - b1) * min(scale, 1.0) * clip, rtol=1e-5)


def test_no_clipping_when_grad_clip_is_zero():
    params, grads = _toy_params_and_grads()
    grads = jax.tree.map(lambda g: g * 100.0, grads)
    opt = build_optimizer(train_cfg(optimizer="adamw", grad_clip=0.0, beta1=0.9, warmup_steps=0, steps=10))
    _, state = opt.update(grads, opt.init(params), params)
    for a, b in zip(jax.tree.leaves(optax.tree.get(state, "mu")), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, 0.1 * b, rtol=1e-5)


# --- gradient accumulation through the optimizer ---------------------------------------------------------------
@pytest.mark.slow
def test_grad_accum_step_equals_one_big_batch():
    """accum=4 micro-batches of 2 rows, one optimizer update, equals one 8-row batch: same loss, grad norm and
    new params (and the step counter moves once). Uneven scored-token counts per micro-batch included, so a
    mean of per-micro means (instead of a sum over all tokens) would fail."""
    cfg = config_lib.load(TINY, ["model.num_layers=1", "data.seq_len=16", "train.warmup_steps=0",
                                 "train.decay=constant"])
    model, optimizer = models.build(cfg), build_optimizer(cfg.train)
    schedule = learning_rate_schedule(cfg.train)
    mesh = make_mesh(cfg.parallel, jax.devices()[:1])
    state, _ = create_state(model, optimizer, 16, mesh, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (8, 17)).astype(np.int32)
    mask = np.ones((8, 16), np.float32)
    mask[1, 3:] = 0  # rows 1 and 6 score fewer tokens (row r goes to micro-batch r % 4)
    mask[6, 10:] = 0
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    one, m_one = jax.jit(make_train_step(model, optimizer, schedule, 1))(state, batch)
    four, m_four = jax.jit(make_train_step(model, optimizer, schedule, 4))(state, batch)
    assert int(one.step) == int(four.step) == 1
    np.testing.assert_allclose(float(m_four["loss"]), float(m_one["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_four["grad_norm"]), float(m_one["grad_norm"]), rtol=1e-5)
    assert float(m_four["tokens"]) == float(m_one["tokens"]) == mask.sum()
    # Adam's first step moves each parameter by ~lr * sign(g) (lr = 3e-3); atol 1e-5 allows the k biases, whose
    # true gradient is 0 (softmax ignores a per-query constant) and whose float noise Adam turns into ~1e-6 steps.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(four.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
