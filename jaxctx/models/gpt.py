"""Causal language models: GPT-2 (Radford et al., 2019) and LLaMA (Touvron et al., 2023, arXiv:2302.13971).

Both are pre-norm decoders built from `jaxctx.models.layers`; the family decides the pieces:

| family | positions          | norm      | MLP             | biases | attention   | head                     |
|--------|--------------------|-----------|-----------------|--------|-------------|--------------------------|
| gpt2   | learned table [P,D]| LayerNorm | GELU(tanh), 4D  | yes    | MHA         | tied to token_embed      |
| llama  | RoPE (theta, scale)| RMSNorm   | SwiGLU, ff_dim  | no     | GQA, any Dh | tied or lm_head [D, V]   |

Param tree (f32; scan_layers=True stacks every block param on a leading [L] axis under `layers/`;
scan_layers=False has `layers_0/`, `layers_1/`, ... with the same leaves and no [L] axis):

gpt2 (D = d_model, H = heads, Dh = D/H, F = 4D, V = vocab, P = max_positions)
    token_embed/embedding      [V, D]      (also the output head: logits = h @ embedding.T)
    pos_embed/embedding        [P, D]
    layers/attn_norm/{scale,bias}          [L, D]
    layers/attn/q_kernel, k_kernel, v_kernel   [L, D, H, Dh]     q_bias, k_bias, v_bias  [L, H, Dh]
    layers/attn/o_kernel       [L, H, Dh, D]                    o_bias  [L, D]
    layers/mlp_norm/{scale,bias}           [L, D]
    layers/mlp/up_kernel       [L, D, F]   up_bias   [L, F]
    layers/mlp/down_kernel     [L, F, D]   down_bias [L, D]
    final_norm/{scale,bias}    [D]

llama (Hkv = kv heads, Dh = head_dim, F = ff_dim)
    token_embed/embedding      [V, D]
    layers/attn_norm/scale     [L, D]
    layers/attn/q_kernel       [L, D, H, Dh]    k_kernel, v_kernel [L, D, Hkv, Dh]    o_kernel [L, H, Dh, D]
    layers/mlp_norm/scale      [L, D]
    layers/mlp/gate_kernel, up_kernel   [L, D, F]     down_kernel [L, F, D]
    final_norm/scale           [D]
    lm_head/kernel             [D, V]      (only when untied; tied models use token_embed/embedding)

HF correspondences (for the converter): gpt2 c_attn [D, 3D] splits into q/k/v kernels reshaped [D, H, Dh];
c_proj [D, D] is o_kernel reshaped [H, Dh, D]; ln_1/ln_2/ln_f are attn_norm/mlp_norm/final_norm; c_fc/c_proj are
up/down. llama q_proj.weight [H*Dh, D] is q_kernel transposed and reshaped; gate/up/down_proj likewise.
"""

from __future__ import annotations

import math

import flax.linen as nn

from jaxctx.config import ModelConfig
from jaxctx.models.layers import (BTE, Attention, Embed, Mlp, SwiGluMlp, apply_dropout, check_inputs, constrain,
                                  gelu_tanh, layer_stack, lm_logits, lm_loss, make_norm, make_param, normal,
                                  rope_tables, run_layers)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        gpt2 = cfg.family == "gpt2"
        # GPT-2 scales the init of the two residual-output projections by 1/sqrt(2L) (HF _init_weights).
        out_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers) if gpt2 else None
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, use_bias=gpt2, out_std=out_std)
        self.mlp_norm = make_norm(cfg)
        self.mlp = Mlp(cfg, activation=gelu_tanh, out_std=out_std) if gpt2 else SwiGluMlp(cfg)

    def __call__(self, x, segment_ids, rope, cache=None):
        kv = None
        if cache is None:
            y = self.attn(self.attn_norm(x), segment_ids, rope)
        else:  # generation: the layer's new keys/values [B, T, Hkv, Dh] are the scan's per-layer output
            y, kv = self.attn(self.attn_norm(x), segment_ids, rope, cache)
        x = x + apply_dropout(self, y, self.cfg.dropout)  # [B, T, D]; HF GPT-2 resid_dropout after c_proj
        x = x + apply_dropout(self, self.mlp(x, norm=self.mlp_norm.as_function()), self.cfg.dropout)  # norm per chunk
        return constrain(x, BTE), kv


class LMHead(nn.Module):
    """Untied output projection: kernel [D, V]."""

    cfg: ModelConfig

    def setup(self):
        self.kernel = make_param(self, "kernel", normal(self.cfg.initializer_range),
                                 (self.cfg.d_model, self.cfg.vocab_size), ("embed", "vocab"))


class CausalLM(nn.Module):
    """GPT-2 or LLaMA (cfg.family). Methods: __call__ -> logits, loss -> (loss_sum, weight_sum), hidden, extend
    (a generation step with a key/value cache)."""

    cfg: ModelConfig

    def setup(self):
        self.setup_trunk()
        if not self.cfg.tied:
            self.lm_head = LMHead(self.cfg)

    def setup_trunk(self):
        """Everything but the LM head (the task models of jaxctx.models.task_models share it)."""
        cfg = self.cfg
        if cfg.family not in ("gpt2", "llama"):
            raise ValueError(f"CausalLM builds gpt2 or llama, got model.family={cfg.family!r}")
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, cfg)
        if cfg.family == "gpt2":
            self.pos_embed = Embed(cfg.positions, cfg.d_model, cfg, axes=("positions", "embed"))
        self.layers = layer_stack(DecoderBlock, cfg)
        self.final_norm = make_norm(cfg)

    def hidden(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Final-norm hidden states [B, T, D] in the compute dtype."""
        return self._trunk(input_ids, segment_ids, positions, token_type_ids)

    def extend(self, input_ids, positions, cache, segment_ids=None):
        """One generation step: (last-position logits [B, V] f32, (k, v) [L, B, T, Hkv, Dh]).

        cache: `kv_cache.PrefillCache()` (the prompt, with padding as its own segment in segment_ids) or a
        `kv_cache.DecodeCache` (tokens at generated slots [index, index + T) attending to the cache). Only the last
        position is projected to the vocabulary: a long prompt never makes [B, T, V] logits.
        """
        h, kv = self._trunk(input_ids, segment_ids, positions, None, cache=cache)
        return lm_logits(h[:, -1:], *self.head())[:, 0], kv

    def _trunk(self, input_ids, segment_ids, positions, token_type_ids, cache=None):
        cfg = self.cfg
        if token_type_ids is not None:
            raise ValueError(f"token_type_ids is a BERT input; model.family={cfg.family} takes none")
        positions = check_inputs(cfg, input_ids, segment_ids, positions, learned_positions=cfg.family == "gpt2")
        x = self.token_embed(input_ids)  # [B, T, D]
        rope = None
        if cfg.family == "gpt2":
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(positions, cfg)  # cos, sin [B, T, 1, Dh] f32 (scaling applied), shared by every layer
        x = apply_dropout(self, constrain(x, BTE), cfg.dropout)  # HF GPT-2 embd_pdrop (0 for llama: validated)
        if cache is None:
            return self.final_norm(run_layers(self.layers, x, segment_ids, rope, cfg=cfg, block_cls=DecoderBlock))
        x, kv = run_layers(self.layers, x, segment_ids, rope, cfg=cfg, block_cls=DecoderBlock, cache=cache)
        return self.final_norm(x), kv

    def head(self):
        """(matrix, bias, layout) of the output projection, as `jaxctx.ops` cross-entropy functions take it."""
        if self.cfg.tied:
            return self.token_embed.embedding, None, "vd"  # [V, D]
        return self.lm_head.kernel, None, "dv"  # [D, V]

    def __call__(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Next-token logits [B, T, V] in float32."""
        h = self.hidden(input_ids, segment_ids, positions, token_type_ids)
        return lm_logits(h, *self.head())

    def loss(self, input_ids, targets, weights, segment_ids=None, positions=None, token_type_ids=None):
        """Summed token cross-entropy: (loss_sum, weight_sum), f32 scalars. Chunked when cfg.loss_chunk > 0."""
        h = self.hidden(input_ids, segment_ids, positions, token_type_ids)
        return lm_loss(self.cfg, h, *self.head(), targets, weights)
