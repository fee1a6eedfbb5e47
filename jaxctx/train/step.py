"""Train state and the pure, jittable train / eval steps.

`train_step(state, batch) -> (state, metrics)` does the whole optimizer step: gradient accumulation over
micro-batches, global-norm clipping and the optax update (inside the optimizer chain), and a guard that leaves
the state untouched if the loss or the gradients are not finite (the loop then stops and names the step).

Batches are dicts of [B, T] arrays (see jaxctx.data.packing): `input_ids`, `targets`, `loss_mask`,
`segment_ids`, `positions` and, for BERT, `token_type_ids`. The loss is the mean cross-entropy over scored
tokens: sum(ce * loss_mask) / sum(loss_mask) over the whole global batch, however it is split. Task models
(model.task != lm) take `labels` with `label_mask` and `cls_index` [B, E] (sequence) or `loss_mask` [B, T]
(token) instead of targets (TASK_FIELDS); their loss is the mean over examples or scored tokens.

Dropout (model.dropout / model.attention_dropout > 0): the step passes the model a "dropout" rng,
`fold_in(fold_in(PRNGKey(train.seed), DROPOUT_STREAM), state.step)` and then the micro-batch index. The key is a
function of the seed and the step alone, and the masks are counter-based functions of global coordinates
(`jaxctx.ops.dropout`), so a resumed run redraws exactly the uninterrupted run's masks and any mesh draws the same
ones. Eval steps pass no rng: deterministic.

Context parallelism (a mesh `sequence` axis of N > 1 devices): `loss_sums` permutes every [B, T] batch array
once into the zigzag layout of `jaxctx.ops.ring` before the model (positions travel with their tokens, so
RoPE and learned positions see the true ones); the loss is a sum over tokens, so it does not depend on order.
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxctx.config import TASK_DATA
from jaxctx.errors import ConfigError
from jaxctx.ops.ring import to_layout, to_layout_index
from jaxctx.parallel import LOGICAL_RULES, sequence_size

MODEL_INPUTS = ("segment_ids", "positions", "token_type_ids")
# Labelled batches of the task models (docs/models.md "Task heads"): per example [B, E] for sequence tasks (cls_index
# = the token position each example's head reads), per token [B, T] for token tasks.
TASK_FIELDS = {"lm": ("targets", "loss_mask"), "sequence_classification": ("cls_index", "labels", "label_mask"),
               "token_classification": ("labels", "loss_mask")}
PER_EXAMPLE = ("cls_index", "labels", "label_mask")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


DROPOUT_STREAM = 0x64726F70  # "drop": keeps the dropout keys apart from the init key PRNGKey(train.seed)


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The train step's dropout key: a function of train.seed and the optimizer step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), DROPOUT_STREAM), step)


def task_fields(task: str) -> tuple[str, ...]:
    """The batch fields a model.task trains on, besides input_ids and the MODEL_INPUTS."""
    return TASK_FIELDS[task]


def check_task_data(cfg) -> None:
    """Pre-flight: a task model needs labelled batches, which only a data.task pipeline makes (ConfigError)."""
    if cfg.model.task != "lm" and not getattr(cfg.data, "task", None):
        fields = ", ".join(task_fields(cfg.model.task))
        raise ConfigError(f"model.task={cfg.model.task} trains on labelled batches ({fields}); the configured data "
                          f"gives language-model batches (targets, loss_mask) and has no data.task: set "
                          f"data.task={TASK_DATA[cfg.model.task]} with a labelled data.source (docs/finetuning.md) "
                          f"or model.task=lm")


def loss_sums(model: nn.Module, params, batch: dict, dropout_rng: jax.Array | None = None):
    """(summed loss, summed weight) for one batch: cross-entropy over scored tokens for language models; for task
    models (model.task != lm) the task loss over examples (sequence) or scored tokens (token), see
    jaxctx.models.heads. Dropout runs when a key is given."""
    loss_sum, weight_sum, _ = objective_sums(model, params, batch, dropout_rng)
    return loss_sum, weight_sum


def objective_sums(model: nn.Module, params, batch: dict, dropout_rng: jax.Array | None = None):
    """(loss_sum, weight_sum, extras): loss_sums plus a dict of further summed metrics.

    A BERT pretraining batch (data.nsp: it carries `next_sentence_label`) trains MLM + next-sentence prediction
    as HF BertForPreTraining (masked_lm_loss + next_sentence_loss). To keep the step's sum / weight form, the
    summed NSP loss is scaled by mlm_weight / rows, so loss_sum / weight_sum = MLM mean + NSP mean exactly for
    one (micro-)batch; with train.grad_accum > 1 each micro-batch's NSP term carries its own ratio. extras holds
    nsp_sum, nsp_correct and nsp_rows (summed over micro-batches and devices)."""
    if model.cfg.task == "lm" and "next_sentence_label" in batch:
        n = sequence_size(jax.sharding.get_abstract_mesh())
        batch = to_sequence_layout(batch, n)  # zigzag keeps position 0 ([CLS]) at slot 0
        kwargs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        labels = batch["next_sentence_label"][:, 0]  # [B]: constant along the row
        with nn.logical_axis_rules(LOGICAL_RULES) if n > 1 else contextlib.nullcontext():
            mlm_sum, mlm_weight, nsp_sum, correct = model.apply(
                {"params": params}, batch["input_ids"], batch["targets"], batch["loss_mask"], labels,
                method="pretraining_loss", rngs=rngs, **kwargs)
        rows = jnp.float32(labels.shape[0])
        scale = jax.lax.stop_gradient(jnp.maximum(mlm_weight, 1.0)) / rows
        extras = {"nsp_sum": jax.lax.stop_gradient(nsp_sum), "nsp_correct": correct, "nsp_rows": rows}
        return mlm_sum + nsp_sum * scale, mlm_weight, extras
    loss_sum, weight_sum = _task_loss_sums(model, params, batch, dropout_rng)
    return loss_sum, weight_sum, {}


def _task_loss_sums(model: nn.Module, params, batch: dict, dropout_rng: jax.Array | None = None):
    n = sequence_size(jax.sharding.get_abstract_mesh())
    batch = to_sequence_layout(batch, n)
    kwargs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    task = model.cfg.task

    def apply():
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        if task == "lm":
            return model.apply({"params": params}, batch["input_ids"], batch["targets"], batch["loss_mask"],
                               method="loss", rngs=rngs, **kwargs)
        missing = [name for name in task_fields(task) if name not in batch]
        if missing:
            raise ValueError(f"a model.task={task} batch needs {', '.join(task_fields(task))}; it lacks "
                             f"{', '.join(missing)} (batch keys: {', '.join(sorted(batch))})")
        if task == "sequence_classification":
            return model.apply({"params": params}, batch["input_ids"], batch["labels"], batch["label_mask"],
                               method="task_loss", cls_index=batch["cls_index"], rngs=rngs,
                               **kwargs)
        return model.apply({"params": params}, batch["input_ids"], batch["labels"], batch["loss_mask"],
                           method="task_loss", rngs=rngs, **kwargs)

    if n == 1:
        return apply()
    # Split sequences: the models' logical activation constraints must hold, or XLA may keep an activation
    # (the embeddings: a gathered [T, D] position table) whole on every device.
    with nn.logical_axis_rules(LOGICAL_RULES):
        return apply()


def to_sequence_layout(batch: dict, n: int) -> dict:
    """[B, T] arrays in natural order -> the zigzag layout over n devices (n = 1: unchanged).

    Positions are made explicit first (0..T-1 when the batch has none): after the permutation the model could
    not infer them from the token order.
    """
    if n == 1:
        return batch
    b, t = batch["input_ids"].shape
    if "positions" not in batch:
        batch = {**batch, "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    # A sequence-task batch's per-example fields [B, E(, N)] are not token arrays: they stay, and cls_index (a
    # token position) is mapped to the slot that token occupies in the layout.
    per_example = set(PER_EXAMPLE) if "cls_index" in batch else set()
    out = {name: x if name in per_example else to_layout(x, n, "zigzag", axis=1) for name, x in batch.items()}
    if "cls_index" in batch:
        slot = jnp.asarray(np.argsort(to_layout_index(t, n)), jnp.int32)  # [T]: original position -> layout slot
        out["cls_index"] = slot[batch["cls_index"]]
    return out


def _split_micro(batch: dict, accum: int) -> dict:
    """[B, T] -> [accum, B / accum, T]. Rows are dealt round-robin (row r goes to micro-batch r % accum) so each
    micro-batch keeps the batch sharding's per-device row blocks intact."""
    return {k: v.reshape(v.shape[0] // accum, accum, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def grads_and_sums(model, params, batch: dict, accum: int, dropout_rng: jax.Array | None = None):
    """Gradients of the summed loss, plus (loss_sum, weight_sum), accumulated over `accum` micro-batches.

    dropout_rng: None (no dropout) or the step's key; micro-batch m draws from fold_in(key, m)."""
    def objective(p, b, r):
        loss_sum, weight_sum, extras = objective_sums(model, p, b, r)
        return loss_sum, (weight_sum, extras)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def micro_rng(m):
        return None if dropout_rng is None else jax.random.fold_in(dropout_rng, m)

    if accum == 1:
        (loss_sum, (weight_sum, extras)), grads = grad_fn(params, batch, micro_rng(0))
        return grads, loss_sum, weight_sum, extras

    def micro_step(carry, micro):
        grads, loss_sum, weight_sum, extras = carry
        m, micro = micro
        (l_sum, (w_sum, e)), g = grad_fn(params, micro, micro_rng(m))
        return (jax.tree.map(jnp.add, grads, g), loss_sum + l_sum, weight_sum + w_sum,
                jax.tree.map(jnp.add, extras, e)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    extras0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: objective_sums(
        model, params, jax.tree.map(lambda x: x[0], _split_micro(batch, accum)))[2]))
    (grads, loss_sum, weight_sum, extras), _ = jax.lax.scan(
        micro_step, (zeros, jnp.float32(0), jnp.float32(0), extras0),
        (jnp.arange(accum), _split_micro(batch, accum)))
    return grads, loss_sum, weight_sum, extras


def apply_update(state: TrainState, grads, loss_sum, weight_sum, optimizer, schedule,
                 extras: dict | None = None) -> tuple[TrainState, dict]:
    """Mean-normalise the summed gradients, update, and skip the update if anything is non-finite or the batch
    scored no token."""
    denom = jnp.maximum(weight_sum, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A batch with no scored token has nothing to learn from: its zero gradients would still move AdamW's
    # moments and apply weight decay. Skip it like a non-finite step (the loop stops and names the cause).
    apply = finite & (weight_sum > 0)

    def update(params, opt_state):
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    # A non-finite step must not poison the state: keep the old one (the loop stops and reports the step). A cond
    # rather than a where(finite, new, old): with the state donated, a select needs the old and the new optimizer
    # state alive together, and XLA copies every moment buffer to get that -- 2 bytes more per parameter byte
    # at the peak, which for a learned [T, D] position table is ~6 KB per token of context.
    params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), state.params, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "tokens": weight_sum,
               "finite": finite}
    if extras and "nsp_rows" in extras:  # BERT pretraining (data.nsp): the next-sentence objective on its own
        rows = jnp.maximum(extras["nsp_rows"], 1.0)
        metrics["nsp_loss"] = extras["nsp_sum"] / rows
        metrics["nsp_accuracy"] = extras["nsp_correct"] / rows
    return new_state, metrics


def make_train_step(model, optimizer, schedule, accum: int, dropout_seed: int | None = None) -> Callable:
    """The jit-path step: a pure function of (state, batch); shardings are given by the caller's jax.jit.

    dropout_seed: train.seed when the model has a dropout rate > 0, else None (the step compiles without rngs)."""

    def train_step(state: TrainState, batch: dict):
        rng = None if dropout_seed is None else dropout_key(dropout_seed, state.step)
        grads, loss_sum, weight_sum, extras = grads_and_sums(model, state.params, batch, accum, rng)
        return apply_update(state, grads, loss_sum, weight_sum, optimizer, schedule, extras)

    return train_step


def make_pmap_train_step(model, optimizer, schedule, accum: int, axis_name: str = "batch",
                         dropout_seed: int | None = None) -> Callable:
    """The pmap-path step: each device takes its rows; sums are psum-ed so the maths equals the jit path.

    With dropout each device folds its index into the step's key: its rows are numbered from 0 locally, so
    without it every device would drop the same elements. (Deterministic and resumable, but not the jit path's
    masks.)"""

    def train_step(state: TrainState, batch: dict):
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(dropout_key(dropout_seed, state.step), jax.lax.axis_index(axis_name))
        grads, loss_sum, weight_sum, extras = grads_and_sums(model, state.params, batch, accum, rng)
        grads, loss_sum, weight_sum, extras = jax.lax.psum((grads, loss_sum, weight_sum, extras), axis_name)
        return apply_update(state, grads, loss_sum, weight_sum, optimizer, schedule, extras)

    return train_step


def make_eval_step(model) -> Callable:
    """(params, batch) -> (loss_sum, weight_sum); the loop sums these over validation batches."""

    def eval_step(params, batch: dict):
        return loss_sums(model, params, batch)

    return eval_step
