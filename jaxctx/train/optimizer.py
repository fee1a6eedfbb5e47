"""Optax optimizer from the train config: schedule, clipping, decay mask, accumulation."""

from __future__ import annotations

import jax
import optax

from jaxctx.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay to `min_lr_ratio * peak`, or constant."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, cfg.steps)
    final = peak * cfg.min_lr_ratio
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """True for matrices (kernels, embeddings), False for vectors (norm scales, biases): no decay on the latter.

    A stacked (nn.scan) parameter has one extra leading axis, so "matrix" means the last two axes are both
    larger than 1 in the unstacked shape; we decide by name instead, which is exact for our models.
    """
    def is_decayed(path, _leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in ("bias", "scale") and not name.endswith("_bias")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW / Adafactor / Lion with the schedule, global-norm clipping and (optionally) grad accumulation."""
    schedule = learning_rate_schedule(cfg)
    if cfg.optimizer == "adamw":
        core = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "lion":
        core = optax.lion(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                               weight_decay_mask=decay_mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*chain, core)
