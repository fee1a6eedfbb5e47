"""Task heads shared by the families: sequence and token classification, as transformers' task classes define them.

| family | sequence_classification                         | token_classification            |
|--------|-------------------------------------------------|---------------------------------|
| bert   | pooler (tanh dense) on the example's first token| classifier (bias) on every token|
|        | + classifier (bias): BertForSequenceClassification | BertForTokenClassification   |
| gpt2   | score (no bias) on the example's last token:    | classifier (bias):              |
|        | GPT2ForSequenceClassification                   | GPT2ForTokenClassification      |
| llama  | score (no bias) on the example's last token:    | score (bias):                   |
|        | LlamaForSequenceClassification                  | LlamaForTokenClassification     |

Param tree: the backbone's, without its LM head (gpt2/llama `lm_head`, bert `mlm_head`), plus
    pooler/kernel [D, D], pooler/bias [D]              (bert sequence_classification only)
    classifier/kernel [D, N], classifier/bias [N]      (N = model.num_labels; no bias for gpt2/llama sequence)
so a base (LM / MLM) checkpoint's backbone loads as it is (`jaxctx.train.warm_start`).

Packed examples: a row holds several examples, each its own segment (attention never crosses them). A sequence
head reads one token per example, given by `cls_index` [B, E] (the example's first token for bert, its last for
gpt2/llama: the one that has seen the whole example under causal attention); `label_mask` [B, E] marks real
examples (0 = empty slot). Unpacked calls (`__call__`) read one example per row: bert its token 0 ([CLS], as
HF's pooler), gpt2/llama the row's last token whose segment id is not 0 (padding is segment 0 in
`jaxctx.data.packing`; without segment_ids the last token), which is the token HF picks as "the last non-padding
token" when the HF attention mask is `segment_ids > 0` and pad tokens are not used inside the text.

Losses (`sequence_loss`, `token_loss`) return (loss_sum, weight_sum) like the LM loss, so the train step averages
over the global batch however it is split: single_label = cross-entropy per example, multi_label = sigmoid BCE
averaged over labels per example (HF's BCEWithLogitsLoss mean), regression = squared error (HF's MSELoss), token
classification = cross-entropy per scored token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxctx.config import ModelConfig
from jaxctx.models.layers import compute_dtype, make_param, normal, zeros

NSP_LABELS = 2  # BERT next-sentence prediction: is-next / not-next


class Pooler(nn.Module):
    """BERT pooler: tanh(h @ kernel + bias) on the token read for each example. kernel [D, D], bias [D]."""

    cfg: ModelConfig

    def setup(self):
        d = self.cfg.d_model
        self.kernel = make_param(self, "kernel", normal(self.cfg.initializer_range), (d, d), ("embed", "mlp"))
        self.bias = make_param(self, "bias", zeros, (d,), ("mlp",))

    def __call__(self, h: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.cfg)
        return jnp.tanh(h.astype(dtype) @ self.kernel.astype(dtype) + self.bias.astype(dtype))  # [..., D]


class Classifier(nn.Module):
    """Linear head to num_labels logits (float32): kernel [D, N], bias [N] when use_bias."""

    cfg: ModelConfig
    num_labels: int
    use_bias: bool = True

    def setup(self):
        self.kernel = make_param(self, "kernel", normal(self.cfg.initializer_range),
                                 (self.cfg.d_model, self.num_labels), ("embed", "labels"))
        if self.use_bias:
            self.bias = make_param(self, "bias", zeros, (self.num_labels,), ("labels",))

    def __call__(self, h: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.cfg)
        logits = h.astype(dtype) @ self.kernel.astype(dtype)  # [..., N]
        if self.use_bias:
            logits = logits + self.bias.astype(dtype)
        return logits.astype(jnp.float32)


def has_pooler(cfg: ModelConfig) -> bool:
    return cfg.family == "bert" and cfg.task == "sequence_classification"


def classifier_bias(cfg: ModelConfig) -> bool:
    """HF: the gpt2/llama sequence `score` has no bias; every other task classifier has one."""
    return not (cfg.task == "sequence_classification" and cfg.family in ("gpt2", "llama"))


def setup_heads(module: nn.Module) -> None:
    """Inside a task model's setup(): its `pooler` (bert sequence task) and `classifier`."""
    cfg = module.cfg
    if has_pooler(cfg):
        module.pooler = Pooler(cfg)
    module.classifier = Classifier(cfg, cfg.num_labels, classifier_bias(cfg))


# ----------------------------------------------------------------------------------------------------------
# Which token a sequence head reads
# ----------------------------------------------------------------------------------------------------------

def default_cls_index(cfg: ModelConfig, segment_ids, batch: int, length: int) -> jax.Array:
    """[B, 1] index of the token read for one example per row: 0 for bert; the last non-padding token (segment
    id != 0) for gpt2/llama, or T-1 without segment_ids."""
    if cfg.family == "bert":
        return jnp.zeros((batch, 1), jnp.int32)
    if segment_ids is None:
        return jnp.full((batch, 1), length - 1, jnp.int32)
    # as HF: argmax of position * is_real picks the rightmost real token (left or right padding alike)
    real = (segment_ids != 0).astype(jnp.int32)  # [B, T]
    return jnp.argmax(jnp.arange(length, dtype=jnp.int32) * real, axis=-1).astype(jnp.int32)[:, None]


def gather_tokens(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, D], index [B, E] int -> [B, E, D] (the hidden state at each example's read token)."""
    return jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)


# ----------------------------------------------------------------------------------------------------------
# Losses: (loss_sum, weight_sum), f32 scalars
# ----------------------------------------------------------------------------------------------------------

def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [..., N] f32, labels [...] int -> [...] cross-entropy. Ignored labels (e.g. HF's -100) are clipped
    into range; their weight is 0."""
    labels = jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def sequence_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, problem: str):
    """Per-example logits [B, E, N] -> (sum of weighted example losses, sum of weights).

    labels: int [B, E] (single_label), float [B, E, N] multi-hot (multi_label), float [B, E] (regression);
    weights [B, E] (label_mask: 1 = a real example).
    """
    weights = weights.astype(jnp.float32)
    if problem == "single_label":
        per_example = _cross_entropy(logits, labels)
    elif problem == "multi_label":
        if labels.shape != logits.shape:
            raise ValueError(f"multi_label labels must be multi-hot [B, E, num_labels] = {logits.shape}, got "
                             f"{labels.shape}")
        y = labels.astype(jnp.float32)
        # stable BCE with logits: max(x, 0) - x*y + log(1 + exp(-|x|)), averaged over labels as HF's mean does
        per_example = jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=-1)
    elif problem == "regression":
        per_example = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
    else:
        raise ValueError(f"problem {problem!r} is not single_label, multi_label or regression")
    if per_example.shape != weights.shape:
        raise ValueError(f"labels give per-example losses {per_example.shape}, label_mask is {weights.shape}")
    return jnp.sum(per_example * weights), jnp.sum(weights)


def token_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """logits [B, T, N], labels int [B, T], weights [B, T] (loss_mask) -> (sum of weighted CE, sum of weights)."""
    if labels.shape != logits.shape[:2] or weights.shape != logits.shape[:2]:
        raise ValueError(f"labels and loss_mask must be [B, T] = {logits.shape[:2]}, got {labels.shape} and "
                         f"{weights.shape}")
    weights = weights.astype(jnp.float32)
    return jnp.sum(_cross_entropy(logits, labels) * weights), jnp.sum(weights)


# ----------------------------------------------------------------------------------------------------------
# The task methods, assigned as class attributes of each family's task model (jaxctx.models.task_models), which
# provides `task_hidden(input_ids, segment_ids, positions, token_type_ids) -> [B, T, D]`.
# ----------------------------------------------------------------------------------------------------------

def task_call(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
    """Logits in float32: [B, num_labels] (sequence task, one example per row) or [B, T, num_labels] (token)."""
    if self.cfg.task == "token_classification":
        return self.classifier(self.task_hidden(input_ids, segment_ids, positions, token_type_ids))
    index = default_cls_index(self.cfg, segment_ids, *input_ids.shape)
    return self.example_logits(input_ids, index, segment_ids, positions, token_type_ids)[:, 0]


def example_logits(self, input_ids, cls_index, segment_ids=None, positions=None, token_type_ids=None):
    """Sequence task, packed rows: cls_index [B, E] -> per-example logits [B, E, num_labels] float32."""
    if self.cfg.task != "sequence_classification":
        raise ValueError(f"example_logits is for model.task=sequence_classification, not {self.cfg.task}")
    h = gather_tokens(self.task_hidden(input_ids, segment_ids, positions, token_type_ids), cls_index)  # [B, E, D]
    if has_pooler(self.cfg):
        h = self.pooler(h)
    return self.classifier(h)


def task_loss(self, input_ids, labels, weights, segment_ids=None, positions=None, token_type_ids=None,
              cls_index=None):
    """(loss_sum, weight_sum) f32 scalars. Sequence task: labels/weights per example [B, E(, N)] with cls_index
    [B, E]; token task: labels/weights [B, T] (weights = loss_mask)."""
    if self.cfg.task == "token_classification":
        return token_loss(self(input_ids, segment_ids, positions, token_type_ids), labels, weights)
    if cls_index is None:
        raise ValueError("a sequence_classification loss needs cls_index [B, E] (the token read per example)")
    logits = self.example_logits(input_ids, cls_index, segment_ids, positions, token_type_ids)
    return sequence_loss(logits, labels, weights, self.cfg.problem)


def no_lm_loss(self, *args, **kwargs):
    raise ValueError(f"model.task={self.cfg.task} has no language-model loss; use method='task_loss'")
