"""LLaMA (transformers `LlamaForCausalLM`) <-> jaxctx family "llama".

Weight layout, the one place it is handled (`rules`): every projection is a torch nn.Linear, weight (out, in),
transposed ("transpose") to our (in, out) kernel and reshaped into heads:
- `self_attn.q_proj.weight` [H*Dh, D] -> q_kernel [D, H, Dh]; `k_proj`/`v_proj` [Hkv*Dh, D] -> [D, Hkv, Dh]
  (grouped-query attention: query head h uses kv head h // (H / Hkv), as transformers' repeat_kv).
- `self_attn.o_proj.weight` [D, H*Dh] -> o_kernel [H, Dh, D].
- `mlp.{gate,up}_proj.weight` [F, D] -> {gate,up}_kernel [D, F]; `mlp.down_proj.weight` [D, F] -> [F, D].
- `input_layernorm`, `post_attention_layernorm`, `model.norm` (RMSNorm weight) -> attn_norm, mlp_norm,
  final_norm scale.
- `lm_head.weight` [V, D] -> lm_head/kernel [D, V] when untied; tie_word_embeddings=true uses
  `model.embed_tokens` (an lm_head.weight copy in a tied checkpoint must equal it).
- Task models: LlamaFor{Sequence,Token}Classification's `score.weight` [N, D] -> classifier/kernel [D, N]
  (+ `score.bias` [N] for token classification); they replace lm_head.
HF's q/k weights are already in the rotate-half RoPE layout our model uses (no Meta-style permutation).

RoPE config: transformers >= 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...}; 4.x configs have
`rope_theta` and `rope_scaling` {type|rope_type, ...}. Read as transformers 5 reads them: a non-empty
`rope_scaling` wins over `rope_parameters`, and the base is the chosen dict's rope_theta, else the top-level one.
Every type jaxctx implements (config.ROPE_SCALING_FIELDS: default, linear, dynamic, yarn, llama3, longrope) is
carried with the fields transformers reads for it; unset (null) fields are left out, other keys are ignored as
transformers ignores them. Pinned on import so a longer max_positions later does not move the frequencies:
original_max_position_embeddings of llama3 / yarn / longrope (default max_position_embeddings, as transformers'
standardize_rope_params), and a missing yarn / longrope factor (max_position_embeddings / original, as transformers
derives it). dynamic has nothing to pin: transformers scales it past max_position_embeddings itself. Both forms
are written (v4 and v5 read them). The rotary `inv_freq` buffers of old checkpoints are dropped.
"""

from __future__ import annotations

import re

from jaxctx.config import ROPE_SCALING_FIELDS, ROPE_TYPES, ConfigError, ModelConfig, validate_rope_scaling
from jaxctx.convert.mapping import HFConfig, Rule, task_from_hf, task_to_hf

MODEL_TYPE = "llama"
TASK_ARCHITECTURES = {"LlamaForCausalLM": "lm", "LlamaForSequenceClassification": "sequence_classification",
                      "LlamaForTokenClassification": "token_classification"}  # architecture -> model.task
ARCHITECTURES = tuple(TASK_ARCHITECTURES)
EXPORT_ARCHITECTURE = "LlamaForCausalLM"
EXPORT_ARCHITECTURES = {task: arch for arch, task in TASK_ARCHITECTURES.items()}
AUTO_CLASS = "AutoModelForCausalLM"
CARRY_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout")
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
DROPPED = re.compile(r"$^")  # no other heads: any other tensor is an error


def canonical(name: str) -> str:
    return name


def tied_copies(m: ModelConfig) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if m.tied else {}


def _rope_from_hf(c: HFConfig, max_positions, head_dim) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from rope_scaling (v4, read first as transformers 5 does) or rope_parameters."""
    source = "rope_scaling" if c.values.get("rope_scaling") else "rope_parameters"
    params = c.values.get(source) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        c.unsupported(f"{source}={params!r} must be one flat mapping (per-layer-type RoPE is not supported)")
        return 10000.0, None
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        c.unsupported(f"partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
    if kind not in ROPE_TYPES:
        c.unsupported(f"rope_type={kind!r} is not supported (jaxctx implements {', '.join(ROPE_TYPES)})")
        return theta, None
    if kind == "default":
        return theta, None
    required, optional = ROPE_SCALING_FIELDS[kind]
    scaling = {"rope_type": kind, **{k: params[k] for k in required + optional if params.get(k) is not None}}
    if kind in ("llama3", "yarn", "longrope"):
        scaling.setdefault("original_max_position_embeddings", max_positions)
    old = scaling.get("original_max_position_embeddings")
    if kind in ("yarn", "longrope") and "factor" not in scaling and isinstance(old, int) and old > 0:
        scaling["factor"] = max_positions / old
    missing = [k for k in required if k not in scaling]
    if missing:
        c.unsupported(f"rope {kind} scaling lacks {', '.join(missing)}")
        return theta, None
    try:
        validate_rope_scaling(scaling, head_dim, key=source)
    except ConfigError as err:
        c.unsupported(str(err))
        return theta, None
    return theta, scaling


def config_from_hf(hf: dict, where: str) -> dict:
    c = HFConfig(hf, where)
    d, heads = c.require("hidden_size"), c.require("num_attention_heads")
    kv_heads = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim")
    max_positions = c.require("max_position_embeddings")
    theta, scaling = _rope_from_hf(c, max_positions, head_dim or d // heads)
    fields = dict(
        family="llama", d_model=d, num_heads=heads, num_kv_heads=kv_heads, num_layers=c.require("num_hidden_layers"),
        head_dim=head_dim, d_ff=c.require("intermediate_size"), vocab_size=c.require("vocab_size"),
        max_positions=max_positions, norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=float(c.get("initializer_range", 0.02)), pad_token_id=int(c.get("pad_token_id", 0)),
        attention_dropout=c.rate("attention_dropout", 0.0),  # LLaMA has no hidden dropout
        **task_from_hf(c, TASK_ARCHITECTURES))
    if c.get("token_classification_bias", True) is not True:
        c.unsupported("token_classification_bias=false is not supported (the token classifier has a bias)")
    if isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        c.unsupported(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim is None and d % heads:
        c.unsupported(f"hidden_size={d} is not divisible by num_attention_heads={heads} and head_dim is unset")
    c.expect("hidden_act", ("silu",), "silu")
    c.expect("attention_bias", (False,), False)
    c.expect("mlp_bias", (False,), False)
    c.done()
    return fields


def config_to_hf(m: ModelConfig) -> dict:
    """ModelConfig -> config.json keys (max_positions becomes max_position_embeddings)."""
    scaling = {k: list(v) if isinstance(v, tuple) else v for k, v in (m.rope_scaling or {}).items()}
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))  # (both keys popped)
    if kind in ("llama3", "yarn", "longrope"):  # our model falls back to max_positions; written explicitly
        scaling.setdefault("original_max_position_embeddings", m.positions)
    rope_parameters = {"rope_type": kind, "rope_theta": m.rope_theta, **scaling}
    task = task_to_hf(m)
    if m.task == "sequence_classification":  # HF finds each row's last non-padding token by pad_token_id
        task["pad_token_id"] = m.pad_token_id
    return {
        **task, "model_type": MODEL_TYPE, "architectures": [EXPORT_ARCHITECTURES[m.task]],
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ff_dim,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim_per_head, "max_position_embeddings": m.positions, "rms_norm_eps": m.eps,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": m.tied,
        "initializer_range": m.initializer_range, "attention_dropout": m.attention_dropout,
        "rope_parameters": rope_parameters,  # transformers >= 5
        "rope_theta": m.rope_theta,  # transformers 4.x
        "rope_scaling": ({"rope_type": kind, **scaling} if kind != "default" else None),
    }


def export_problems(m: ModelConfig) -> list[str]:
    if m.d_model % m.num_heads:
        return [f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}: transformers' "
                f"LlamaConfig rejects it even with an explicit head_dim"]
    return []


def rules(m: ModelConfig) -> list[Rule]:
    d, f, v = m.d_model, m.ff_dim, m.vocab_size
    hq, hkv = m.num_heads * m.dim_per_head, m.kv_heads * m.dim_per_head
    out = [Rule("model.embed_tokens.weight", (v, d), ("token_embed/embedding",))]
    for i in range(m.num_layers):
        h, o = f"model.layers.{i}.", f"layers_{i}/"
        out += [
            Rule(h + "input_layernorm.weight", (d,), (o + "attn_norm/scale",)),
            Rule(h + "self_attn.q_proj.weight", (hq, d), (o + "attn/q_kernel",), "transpose"),
            Rule(h + "self_attn.k_proj.weight", (hkv, d), (o + "attn/k_kernel",), "transpose"),
            Rule(h + "self_attn.v_proj.weight", (hkv, d), (o + "attn/v_kernel",), "transpose"),
            Rule(h + "self_attn.o_proj.weight", (d, hq), (o + "attn/o_kernel",), "transpose"),
            Rule(h + "post_attention_layernorm.weight", (d,), (o + "mlp_norm/scale",)),
            Rule(h + "mlp.gate_proj.weight", (f, d), (o + "mlp/gate_kernel",), "transpose"),
            Rule(h + "mlp.up_proj.weight", (f, d), (o + "mlp/up_kernel",), "transpose"),
            Rule(h + "mlp.down_proj.weight", (d, f), (o + "mlp/down_kernel",), "transpose"),
        ]
    out.append(Rule("model.norm.weight", (d,), ("final_norm/scale",)))
    if m.task != "lm":  # score: nn.Linear [N, D]; with a bias for token classification (HF's default)
        out.append(Rule("score.weight", (m.num_labels, d), ("classifier/kernel",), "transpose"))
        if m.task == "token_classification":
            out.append(Rule("score.bias", (m.num_labels,), ("classifier/bias",)))
    elif not m.tied:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head/kernel",), "transpose"))
    return out
