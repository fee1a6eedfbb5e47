"""Task heads: param trees (backbone unchanged, LM head out), packed examples equal unpacked ones for every
family, the losses against torch's own loss functions, and the train step on a hand-built labelled batch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxctx.config import ModelConfig
from jaxctx.models import build
from jaxctx.models.heads import sequence_loss, token_loss
from jaxctx.train.step import loss_sums, make_train_step, to_sequence_layout

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
T = 16
N = 3


def tiny(family, **overrides):
    base = dict(family=family, num_layers=2, num_heads=4, d_model=32, vocab_size=64, max_positions=32,
                attention="reference")
    if family == "llama":
        base.update(num_kv_heads=2, head_dim=12, d_ff=48, tie_embeddings=False)
    return ModelConfig(**{**base, **overrides})


def shapes(cfg):
    model = build(cfg)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return jax.tree.map(lambda x: x.shape, nn.meta.unbox(tree))


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.2 * rng.normal(size=shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_task_tree_is_backbone_plus_head(family):
    lm = flat(shapes(tiny(family)))
    lm_only = {k for k in lm if k.startswith(("['lm_head']", "['mlm_head']"))}
    assert bool(lm_only) == (family != "gpt2")  # gpt2 is tied; llama is untied here; bert has its MLM head
    for task in ("sequence_classification", "token_classification"):
        got = flat(shapes(tiny(family, task=task, num_labels=N)))
        backbone = {k: v for k, v in got.items() if not k.startswith(("['classifier']", "['pooler']"))}
        assert backbone == {k: v for k, v in lm.items() if k not in lm_only}
        head = {k: v for k, v in got.items() if k not in backbone}
        want = {"['classifier']['kernel']": (32, N)}
        if not (family != "bert" and task == "sequence_classification"):  # HF's gpt2/llama `score` has no bias
            want["['classifier']['bias']"] = (N,)
        if family == "bert" and task == "sequence_classification":
            want.update({"['pooler']['kernel']": (32, 32), "['pooler']['bias']": (32,)})
        assert head == want


def packed_row(lengths, seed=0):
    """One row of T tokens with examples of `lengths` packed in order (segments 1..E), then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, (1, T)).astype(np.int32)
    seg, pos, cls_first, cls_last = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32), [], []
    start = 0
    for e, n in enumerate(lengths):
        seg[0, start:start + n], pos[0, start:start + n] = e + 1, np.arange(n)
        cls_first.append(start)
        cls_last.append(start + n - 1)
        start += n
    return ids, seg, pos, np.array([cls_first], np.int32), np.array([cls_last], np.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_packed_examples_equal_unpacked(family):
    lengths = (5, 4, 6)  # 15 of 16 tokens, one padding token
    ids, seg, pos, first, last = packed_row(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # unpacked: each example alone at the start of its own row, the rest padding (segment 0)
    rows = np.zeros((len(lengths), T), np.int32)
    row_seg = np.zeros((len(lengths), T), np.int32)
    for e, (s, n) in enumerate(zip(starts, lengths)):
        rows[e, :n], row_seg[e, :n] = ids[0, s:s + n], 1

    cfg = tiny(family, task="sequence_classification", num_labels=N)
    model, params = build(cfg), random_params(cfg)
    cls_index = first if family == "bert" else last
    packed = jit(functools.partial(model.apply, method="example_logits"))(
        {"params": params}, ids, cls_index, segment_ids=seg, positions=pos)  # [1, E, N]
    alone = jit(model.apply)({"params": params}, rows, segment_ids=row_seg)  # [E, N]
    assert packed.shape == (1, 3, N) and alone.shape == (3, N)
    np.testing.assert_allclose(packed[0], alone, atol=1e-5, rtol=0)
    assert np.abs(np.diff(np.asarray(alone), axis=0)).max() > 1e-3  # examples differ: the test can fail

    tok = tiny(family, task="token_classification", num_labels=N)
    model, params = build(tok), random_params(tok)
    packed = jit(model.apply)({"params": params}, ids, segment_ids=seg, positions=pos)  # [1, T, N]
    alone = jit(model.apply)({"params": params}, rows, segment_ids=row_seg)  # [E, T, N]
    for e, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(packed[0, s:s + n], alone[e, :n], atol=1e-5, rtol=0)


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, N)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # 3 real examples
    real = mask.astype(bool)
    t = torch.as_tensor(logits[real])

    labels = rng.integers(0, N, (2, 3)).astype(np.int32)
    s, w = sequence_loss(jnp.asarray(logits), labels, mask, "single_label")
    assert float(w) == 3
    np.testing.assert_allclose(s / w, F.cross_entropy(t, torch.as_tensor(labels[real]).long()).item(), rtol=1e-6)

    hot = rng.integers(0, 2, (2, 3, N)).astype(np.float32)
    s, w = sequence_loss(jnp.asarray(logits), hot, mask, "multi_label")
    np.testing.assert_allclose(s / w, F.binary_cross_entropy_with_logits(t, torch.as_tensor(hot[real])).item(),
                               rtol=1e-6)

    target = rng.normal(size=(2, 3)).astype(np.float32)
    s, w = sequence_loss(jnp.asarray(logits[..., :1]), target, mask, "regression")
    np.testing.assert_allclose(s / w, F.mse_loss(t[:, 0], torch.as_tensor(target[real])).item(), rtol=1e-6)

    tok_logits = rng.normal(size=(2, 5, N)).astype(np.float32)
    tags = rng.integers(0, N, (2, 5)).astype(np.int32)
    scored = rng.integers(0, 2, (2, 5)).astype(np.float32)
    tags[scored == 0] = -100  # HF's ignore index; our loss_mask is 0 there
    s, w = token_loss(jnp.asarray(tok_logits), tags, scored)
    ref = F.cross_entropy(torch.as_tensor(tok_logits).reshape(-1, N), torch.as_tensor(tags).reshape(-1).long(),
                          ignore_index=-100).item()
    np.testing.assert_allclose(s / w, ref, rtol=1e-6)


def test_sequence_layout_maps_cls_index():
    """Context parallelism permutes tokens; cls_index must then point at the same token in its new slot."""
    ids = np.arange(2 * T, dtype=np.int32).reshape(2, T)
    cls_index = np.array([[0, 5, 15], [3, 8, 12]], np.int32)
    batch = {"input_ids": ids, "cls_index": cls_index, "labels": np.zeros((2, 3), np.int32),
             "label_mask": np.ones((2, 3), np.float32)}
    out = to_sequence_layout(batch, 2)
    assert not np.array_equal(out["input_ids"], ids)  # the layout did move tokens
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(out["input_ids"]), np.asarray(out["cls_index"]),
                                                     axis=1), np.take_along_axis(ids, cls_index, axis=1))
    np.testing.assert_array_equal(out["labels"], batch["labels"])


def test_train_step_on_packed_sequence_batch():
    """loss_sums routes a task batch to task_loss; a few AdamW steps on one batch lower its loss."""
    cfg = tiny("gpt2", task="sequence_classification", num_labels=N)
    model, params = build(cfg), random_params(cfg)
    ids, seg, pos, _, last = packed_row((5, 4, 6), seed=1)
    batch = {"input_ids": np.repeat(ids, 2, 0), "segment_ids": np.repeat(seg, 2, 0),
             "positions": np.repeat(pos, 2, 0), "cls_index": np.repeat(last, 2, 0),
             "labels": np.array([[0, 1, 2], [2, 2, 0]], np.int32),
             "label_mask": np.array([[1, 1, 1], [1, 1, 0]], np.float32)}
    loss_sum, weight_sum = loss_sums(model, params, batch)
    logits = model.apply({"params": params}, batch["input_ids"], batch["cls_index"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"], method="example_logits")
    expected = sequence_loss(logits, batch["labels"], batch["label_mask"], "single_label")
    np.testing.assert_allclose([loss_sum, weight_sum], expected, rtol=1e-6)
    assert float(weight_sum) == 5

    from jaxctx.train.step import TrainState
    optimizer = optax.adam(1e-2)
    step = jit(make_train_step(model, optimizer, lambda s: 1e-2, accum=2))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], float(loss_sum / weight_sum), rtol=1e-5)  # accum=2 keeps the mean
    assert losses[-1] < losses[0] * 0.8, losses


@pytest.mark.parametrize("overrides", [
    {"family": "llama", "task": "sequence_classification", "num_labels": 4, "problem_type": "multi_label"},
    {"family": "bert", "task": "token_classification", "num_labels": 5},
])
def test_synthetic_task_batches_fit_the_step(overrides):
    """`jaxctx plan` / `bench train` build task batches from the config: the abstract and the synthetic batch agree,
    and the step's loss takes them."""
    from jaxctx import config as config_lib
    from jaxctx.bench.trainstep import abstract_batch, synthetic_batch

    model_cfg = {k: v for k, v in vars(tiny(overrides["family"])).items() if v is not None}
    cfg = config_lib.from_dict({"model": {**model_cfg, **overrides}, "data": {"seq_len": T},
                                "train": {"batch_size": 2}}).resolved()
    batch = synthetic_batch(cfg)
    abstract = abstract_batch(cfg, None)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == \
        {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()}
    loss_sum, weight_sum = jit(lambda p, b: loss_sums(build(cfg), p, b))(random_params(cfg.model), batch)
    assert np.isfinite(float(loss_sum)) and float(weight_sum) == (2 if cfg.model.task != "token_classification"
                                                                  else 2 * T)


def test_context_parallel_task_loss_equals_one_device():
    """parallel.sequence=2: tokens move to the zigzag layout and cls_index with them; the loss is unchanged. (A token
    task's [B, T] fields move like a language model's targets, which tests/train/test_context_parallel.py covers.)"""
    task = "sequence_classification"
    from jaxctx import config as config_lib
    from jaxctx.parallel import make_mesh
    from jaxctx.train.runner import make_runner

    def runner(sequence):
        cfg = config_lib.from_dict({
            "model": {"family": "llama", "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "d_model": 32,
                      "vocab_size": 64, "task": task, "num_labels": N},
            "data": {"seq_len": T}, "train": {"batch_size": 2}, "parallel": {"sequence": sequence}}).resolved()
        return make_runner(cfg, make_mesh(cfg.parallel, jax.devices()[:sequence])), cfg

    ids, seg, pos, _, last = packed_row((5, 4, 6), seed=2)
    rng = np.random.default_rng(3)
    batch = {"input_ids": np.repeat(ids, 2, 0), "segment_ids": np.repeat(seg, 2, 0), "positions": np.repeat(pos, 2, 0)}
    # E = 2 example slots per row (a multiple of parallel.sequence)
    batch.update(cls_index=np.repeat(last[:, 1:], 2, 0), labels=rng.integers(0, N, (2, 2)).astype(np.int32),
                 label_mask=np.ones((2, 2), np.float32))
    one, cfg = runner(1)
    two, _ = runner(2)
    state = one.init(0)
    want = one.eval(state, one.put_batch(batch))
    state_two = two.with_params(two.init(0), jax.device_put(jax.device_get(state.params),
                                                              two.state_shardings.params))
    got = two.eval(state_two, two.put_batch(batch))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
