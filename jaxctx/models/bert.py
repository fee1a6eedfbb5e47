"""BERT encoder with the masked-LM head, matching HF `BertForMaskedLM` (Devlin et al., 2019, arXiv:1810.04805).

Embeddings: word + learned position + token type, then LayerNorm. Post-norm encoder layers:
x = LN(x + attn(x)); x = LN(x + mlp(x)) with mlp = dense(F) + bias, GELU(erf), dense(D) + bias. MLM head: dense
D x D + bias, GELU(erf), LayerNorm, then the decoder tied to the word embeddings plus an output bias [V]. No
pooler (unless model.nsp_head). Attention is bidirectional; padding is its own segment id, so real tokens never see it.
Dropout (cfg.dropout, cfg.attention_dropout; train step only) sits where HF's does: after the embedding
LayerNorm, on the attention probabilities, on the attention and MLP outputs before their residual add.

Param tree (f32; scan_layers=True stacks block params on a leading [L] axis under `layers/`; scan_layers=False has
`layers_0/`, ... without it). D = d_model, H = heads, Dh = D/H, F = ff_dim (4D), V = vocab, P = max_positions,
TV = type_vocab_size:
    token_embed/embedding      [V, D]     (also the MLM decoder: logits = h @ embedding.T + output_bias)
    pos_embed/embedding        [P, D]
    type_embed/embedding       [TV, D]
    embed_norm/{scale,bias}    [D]
    layers/attn/q_kernel, k_kernel, v_kernel  [L, D, H, Dh]     q_bias, k_bias, v_bias [L, H, Dh]
    layers/attn/o_kernel       [L, H, Dh, D]                   o_bias [L, D]
    layers/attn_norm/{scale,bias}          [L, D]   (HF attention.output.LayerNorm)
    layers/mlp/up_kernel [L, D, F]  up_bias [L, F]  down_kernel [L, F, D]  down_bias [L, D]
    layers/mlp_norm/{scale,bias}           [L, D]   (HF output.LayerNorm)
    mlm_head/dense_kernel      [D, D]     dense_bias [D]      (HF cls.predictions.transform.dense)
    mlm_head/norm/{scale,bias} [D]                            (HF cls.predictions.transform.LayerNorm)
    mlm_head/output_bias       [V]                            (HF cls.predictions.bias)
With model.nsp_head (BertForPreTraining):
    pooler/kernel [D, D], pooler/bias [D]                     (HF bert.pooler.dense)
    nsp_head/kernel [D, 2], nsp_head/bias [2]                 (HF cls.seq_relationship)
Task models (jaxctx.models.heads) keep the encoder's tree and replace the MLM head by their own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxctx.config import ModelConfig
from jaxctx.models.heads import NSP_LABELS, Classifier, Pooler
from jaxctx.models.layers import (BTE, Attention, Embed, LayerNorm, Mlp, apply_dropout, check_inputs, compute_dtype,
                                  constrain, gelu_erf, layer_stack, lm_logits, lm_loss, make_param, normal, run_layers,
                                  zeros)


class EncoderBlock(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    cfg: ModelConfig

    def setup(self):
        self.attn = Attention(self.cfg, use_bias=True)
        self.attn_norm = LayerNorm(self.cfg)
        self.mlp = Mlp(self.cfg, activation=gelu_erf)
        self.mlp_norm = LayerNorm(self.cfg)

    def __call__(self, x, segment_ids, rope, cache=None):
        del rope  # BERT has learned absolute positions
        if cache is not None:
            raise ValueError("BERT is an encoder: it has no key/value cache (generation needs model.family "
                             "gpt2 or llama)")
        x = self.attn_norm(x + apply_dropout(self, self.attn(x, segment_ids, None), self.cfg.dropout))  # [B, T, D]
        x = self.mlp_norm(x + apply_dropout(self, self.mlp(x), self.cfg.dropout))
        return constrain(x, BTE), None  # (scan carry, no per-layer output)


class MlmHead(nn.Module):
    """The transform before the tied decoder (dense, GELU, LayerNorm) and the decoder's output bias."""

    cfg: ModelConfig

    def setup(self):
        d = self.cfg.d_model
        # [D, D]: the output axis is named "mlp" so tensor parallelism may split it like an MLP up-projection.
        self.dense_kernel = make_param(self, "dense_kernel", normal(self.cfg.initializer_range), (d, d),
                                       ("embed", "mlp"))
        self.dense_bias = make_param(self, "dense_bias", zeros, (d,), ("mlp",))
        self.norm = LayerNorm(self.cfg)
        self.output_bias = make_param(self, "output_bias", zeros, (self.cfg.vocab_size,), ("vocab",))

    def __call__(self, h):
        dtype = compute_dtype(self.cfg)
        h = h @ self.dense_kernel.astype(dtype) + self.dense_bias.astype(dtype)  # [B, T, D]
        return self.norm(jax.nn.gelu(h, approximate=False))


class BertMLM(nn.Module):
    """BertForMaskedLM. Methods: __call__ -> MLM logits, loss -> (loss_sum, weight_sum), hidden."""

    cfg: ModelConfig

    def setup(self):
        self.setup_encoder()
        self.mlm_head = MlmHead(self.cfg)
        if self.cfg.nsp_head:  # BertForPreTraining's pooler and next-sentence head
            self.pooler = Pooler(self.cfg)
            self.nsp_head = Classifier(self.cfg, NSP_LABELS)

    def setup_encoder(self):
        """Embeddings and layers (the task models of jaxctx.models.task_models share them)."""
        cfg = self.cfg
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, cfg)
        self.pos_embed = Embed(cfg.positions, cfg.d_model, cfg, axes=("positions", "embed"))
        self.type_embed = Embed(cfg.type_vocab_size, cfg.d_model, cfg, axes=("token_types", "embed"))
        self.embed_norm = LayerNorm(cfg)
        self.layers = layer_stack(EncoderBlock, cfg)

    def encode(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Encoder output [B, T, D] (HF `last_hidden_state`), compute dtype."""
        cfg = self.cfg
        positions = check_inputs(cfg, input_ids, segment_ids, positions, token_type_ids, learned_positions=True)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.token_embed(input_ids) + self.pos_embed(positions) + self.type_embed(token_type_ids)
        x = apply_dropout(self, constrain(self.embed_norm(x), BTE), cfg.dropout)  # [B, T, D]
        return run_layers(self.layers, x, segment_ids, None, cfg=self.cfg, block_cls=EncoderBlock)

    def hidden(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """MLM-transformed hidden states [B, T, D]: the input of the tied decoder."""
        return self.mlm_head(self.encode(input_ids, segment_ids, positions, token_type_ids))

    def head(self):
        """(matrix, bias, layout) of the decoder: the word embeddings [V, D] and the output bias [V]."""
        return self.token_embed.embedding, self.mlm_head.output_bias, "vd"

    def __call__(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """MLM logits [B, T, V] in float32."""
        h = self.hidden(input_ids, segment_ids, positions, token_type_ids)
        if self.cfg.nsp_head and self.is_initializing():  # create the next-sentence head's params too
            self.nsp_head(self.pooler(h[:, 0]))
        return lm_logits(h, *self.head())

    def nsp_logits(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Next-sentence logits [B, 2] f32 (model.nsp_head): pooler on each row's first token, as
        BertForPreTraining (label 0 = the second segment continues the first)."""
        if not self.cfg.nsp_head:
            raise ValueError("nsp_logits needs model.nsp_head=true (the BertForPreTraining head)")
        h = self.encode(input_ids, segment_ids, positions, token_type_ids)
        return self.nsp_head(self.pooler(h[:, 0]))

    def loss(self, input_ids, targets, weights, segment_ids=None, positions=None, token_type_ids=None):
        """Summed MLM cross-entropy: (loss_sum, weight_sum); weights are 1 at masked positions, 0 elsewhere."""
        h = self.hidden(input_ids, segment_ids, positions, token_type_ids)
        return lm_loss(self.cfg, h, *self.head(), targets, weights)

    def pretraining_loss(self, input_ids, targets, weights, next_sentence_label, segment_ids=None, positions=None,
                         token_type_ids=None):
        """BertForPreTraining's two objectives from one encoder pass (model.nsp_head).

        Returns (mlm_sum, mlm_weight, nsp_sum, nsp_correct): summed MLM cross-entropy over masked positions and
        its weight, summed next-sentence cross-entropy over the B rows, and how many rows' NSP argmax equals
        `next_sentence_label` [B] (0 IsNext, 1 NotNext). HF's loss is mlm_sum / mlm_weight + nsp_sum / B.
        """
        if not self.cfg.nsp_head:
            raise ValueError("pretraining_loss needs model.nsp_head=true (the BertForPreTraining head)")
        h = self.encode(input_ids, segment_ids, positions, token_type_ids)  # [B, T, D]
        mlm_sum, mlm_weight = lm_loss(self.cfg, self.mlm_head(h), *self.head(), targets, weights)
        nsp = self.nsp_head(self.pooler(h[:, 0])).astype(jnp.float32)  # [B, 2]
        log_probs = jax.nn.log_softmax(nsp, axis=-1)
        nsp_ce = -jnp.take_along_axis(log_probs, next_sentence_label[:, None].astype(jnp.int32), axis=-1)[:, 0]
        correct = (jnp.argmax(nsp, axis=-1) == next_sentence_label).astype(jnp.float32)
        return mlm_sum, mlm_weight, nsp_ce.sum(), correct.sum()
