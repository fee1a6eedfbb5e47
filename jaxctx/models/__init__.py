"""Model families (Flax linen): gpt2 and llama (`gpt.CausalLM`), bert (`bert.BertMLM`).

    model = jaxctx.models.build(cfg)                      # cfg: jaxctx.config.Config or ModelConfig
    params = model.init(rng, input_ids)["params"]         # f32, boxed with logical axis names (nn.Partitioned)
    logits = model.apply({"params": params}, input_ids)   # [B, T, V] float32
    loss_sum, weight_sum = model.apply({"params": params}, input_ids, targets, weights, method="loss")

Every method takes the optional keyword inputs `segment_ids` [B, T] (a token attends only within its segment:
packed documents, and padding as a segment of its own), `positions` [B, T] (restarting at 0 per packed document;
default arange(T)) and, for bert only, `token_type_ids` [B, T].

Methods (the modules are setup()-style so several entry points share one param tree):
- `__call__(input_ids, ...)` -> logits [B, T, V] f32 (next-token logits for gpt2/llama, MLM logits for bert).
- `loss(input_ids, targets, weights, ...)` -> (loss_sum, weight_sum), f32 scalars. targets/weights [B, T] are
  aligned with the input positions (next tokens for causal LMs, MLM labels for bert; weight 0 = ignored). With
  cfg.loss_chunk > 0 the [B, T, V] logits are never materialised (`jaxctx.ops.chunked_cross_entropy`).
- `hidden(input_ids, ...)` -> [B, T, D]: the input of the output projection; `head()` -> (matrix, bias, layout).

Task models (model.task = sequence_classification | token_classification; jaxctx.models.heads): the same backbone
tree without the LM head, plus `pooler` (bert sequence task) and `classifier`. `__call__` -> [B, num_labels] (one
example per row) or [B, T, num_labels]; `example_logits(input_ids, cls_index, ...)` -> [B, E, num_labels] for
packed examples; `task_loss(input_ids, labels, weights, ..., cls_index=)` -> (loss_sum, weight_sum).

Chunking and memory knobs (ModelConfig): mlp_chunk (MLP over sequence chunks under remat), loss_chunk, attention
(+ attention_block_q/k), remat_policy, scan_layers. The param tree of each family is documented in gpt.py and
bert.py; `stack_layers` / `unstack_layers` convert between the scanned and unscanned layouts.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxctx.config import Config, ModelConfig
from jaxctx.models.bert import BertMLM
from jaxctx.models.gpt import CausalLM
from jaxctx.models.task_models import BertTaskModel, CausalTaskModel


def build(cfg: Config | ModelConfig) -> nn.Module:
    """The linen Module for cfg's family. A full Config is resolved (max_positions = data.seq_len if unset)."""
    if isinstance(cfg, Config):
        model_cfg = cfg.resolved().model
    elif isinstance(cfg, ModelConfig):
        model_cfg = cfg
        model_cfg.validate()
    else:
        raise TypeError(f"build expects a jaxctx.config.Config or ModelConfig, got {type(cfg).__name__}")
    if model_cfg.family in ("gpt2", "bert"):
        model_cfg.positions  # noqa: B018 - raises a ConfigError naming model.max_positions when it is unset
    if model_cfg.rope_scaling is not None:
        # A plain dict would make the config, and so the Module, unhashable (jit and lifted transforms hash it).
        # longrope's factor lists become tuples for the same reason.
        scaling = {k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.rope_scaling.items()}
        model_cfg = dataclasses.replace(model_cfg, rope_scaling=FrozenDict(scaling))
    if model_cfg.task != "lm":
        return BertTaskModel(model_cfg) if model_cfg.family == "bert" else CausalTaskModel(model_cfg)
    if model_cfg.family == "bert":
        return BertMLM(model_cfg)
    return CausalLM(model_cfg)


_LAYER = re.compile(r"layers_(\d+)$")


def unstack_layers(params: dict) -> dict:
    """Scanned params (`layers/...` with a leading [L] axis) -> unscanned (`layers_0/...`, `layers_1/...`).

    Works on unboxed params (`flax.linen.meta.unbox`); other top-level entries are kept as they are.
    """
    params = dict(params)
    stacked = params.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def stack_layers(params: dict) -> dict:
    """Unscanned params (`layers_0/...`, ...) -> scanned (`layers/...` with a leading [L] axis). Unboxed params."""
    params = dict(params)
    indices = sorted(int(m.group(1)) for k in params if (m := _LAYER.match(k)))
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"stack_layers expects layers_0..layers_{{L-1}}, got {sorted(params)}")
    blocks = [params.pop(f"layers_{i}") for i in indices]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return params


__all__ = ["build", "stack_layers", "unstack_layers", "CausalLM", "BertMLM", "BertTaskModel", "CausalTaskModel"]
