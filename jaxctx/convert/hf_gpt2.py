"""GPT-2 (transformers `GPT2LMHeadModel`) <-> jaxctx family "gpt2".

Weight layout, the one place it is handled (`rules`): GPT-2 uses `Conv1D`, whose weight is (in, out) -- the
transpose of nn.Linear -- and already our (input..., output...) kernel order, so no GPT-2 tensor is transposed:
- `attn.c_attn` is q, k, v fused along the output axis: weight [D, 3D] / bias [3D] split in three ("split3"), each
  reshaped to q_kernel [D, H, Dh] / q_bias [H, Dh] (head h = columns h*Dh..(h+1)*Dh-1 of each third).
- `attn.c_proj.weight` [D(in = H*Dh), D] is o_kernel [H, Dh, D] reshaped; `mlp.c_fc` / `mlp.c_proj` are
  up_kernel [D, F] / down_kernel [F, D] as they are.
- `ln_1`, `ln_2`, `ln_f` are attn_norm, mlp_norm, final_norm ({weight, bias} -> {scale, bias}).
- The LM head is tied to `wte` (GPT2LMHeadModel); an untied head (tie_word_embeddings=false) is `lm_head.weight`
  [V, D], a torch Linear, transposed to lm_head/kernel [D, V].

Names are written with the `transformer.` prefix (what save_pretrained writes); on import the prefix is optional
(the original `gpt2` hub checkpoints and GPT2Model have none). The causal-mask buffers `attn.bias` /
`attn.masked_bias` of old checkpoints are dropped; an `lm_head.weight` in a tied checkpoint must equal `wte`.

Task models (model.task): GPT2ForSequenceClassification's `score.weight` [N, D] (no bias) and
GPT2ForTokenClassification's `classifier.{weight [N, D], bias [N]}` are classifier/kernel [D, N] (transposed) and
classifier/bias; they replace the LM head. id2label / label2id / problem_type are mapping.task_from_hf/task_to_hf.
"""

from __future__ import annotations

import re

from jaxctx.config import ModelConfig
from jaxctx.convert.mapping import HFConfig, Rule, task_from_hf, task_to_hf

MODEL_TYPE = "gpt2"
# architecture -> model.task (accepted on import)
TASK_ARCHITECTURES = {"GPT2LMHeadModel": "lm", "GPT2Model": "lm",
                      "GPT2ForSequenceClassification": "sequence_classification",
                      "GPT2ForTokenClassification": "token_classification"}
ARCHITECTURES = tuple(TASK_ARCHITECTURES)
EXPORT_ARCHITECTURE = "GPT2LMHeadModel"
EXPORT_ARCHITECTURES = {"lm": EXPORT_ARCHITECTURE, "sequence_classification": "GPT2ForSequenceClassification",
                        "token_classification": "GPT2ForTokenClassification"}
AUTO_CLASS = "AutoModelForCausalLM"
# Non-architectural config keys carried from the source config.json on export (token ids, dropout rates).
CARRY_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "resid_pdrop", "embd_pdrop", "attn_pdrop",
              "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
              "summary_first_dropout", "task_specific_params")
IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights
DROPPED = re.compile(r"$^")  # no other heads: any other tensor is an error


def canonical(name: str) -> str:
    """Tensor names with or without the `transformer.` prefix -> with it (the head stays `lm_head.weight`)."""
    if name.startswith(("transformer.", "lm_head.", "score.", "classifier.")):  # heads sit beside the trunk
        return name
    return "transformer." + name


def tied_copies(m: ModelConfig) -> dict[str, str]:
    """Tensors that may appear as copies of another in a tied checkpoint: {name: name it must equal}."""
    return {"lm_head.weight": "transformer.wte.weight"} if m.tied else {}


def config_from_hf(hf: dict, where: str) -> dict:
    """config.json -> ModelConfig fields (every unsupported setting listed in one error)."""
    c = HFConfig(hf, where)
    d, heads = c.require("n_embd"), c.require("n_head")
    fields = dict(
        family="gpt2", d_model=d, num_heads=heads, num_layers=c.require("n_layer"),
        vocab_size=c.require("vocab_size"), max_positions=c.require("n_positions"),
        d_ff=c.get("n_inner"), norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        initializer_range=float(c.get("initializer_range", 0.02)),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), pad_token_id=int(c.get("pad_token_id", 0)),
        # jaxctx has one rate for embeddings and residuals: resid_pdrop (HF GPT2Config defaults all three to 0.1)
        dropout=c.rate("resid_pdrop", 0.1), attention_dropout=c.rate("attn_pdrop", 0.1),
        **task_from_hf(c, TASK_ARCHITECTURES))
    if d % heads:
        c.unsupported(f"n_embd={d} is not divisible by n_head={heads}")
    c.expect("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")  # both are tanh GELU
    c.expect("scale_attn_weights", (True,), True)
    c.expect("scale_attn_by_inverse_layer_idx", (False,), False)
    c.expect("add_cross_attention", (False,), False)
    c.done()
    return fields


def config_to_hf(m: ModelConfig) -> dict:
    """ModelConfig -> the architecture keys of config.json (max_positions becomes n_positions)."""
    task = task_to_hf(m)
    if m.task == "sequence_classification":  # HF finds each row's last non-padding token by pad_token_id
        task["pad_token_id"] = m.pad_token_id
    return {
        **task, "model_type": MODEL_TYPE, "architectures": [EXPORT_ARCHITECTURES[m.task]],
        "vocab_size": m.vocab_size, "n_positions": m.positions, "n_embd": m.d_model, "n_layer": m.num_layers,
        "n_head": m.num_heads, "n_inner": m.d_ff, "activation_function": "gelu_new",
        "layer_norm_epsilon": m.eps, "initializer_range": m.initializer_range, "tie_word_embeddings": m.tied,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.attention_dropout,
    }


def export_problems(m: ModelConfig) -> list[str]:
    """What a jaxctx gpt2 config has that transformers' GPT-2 cannot express."""
    if m.dim_per_head * m.num_heads != m.d_model:
        return [f"model.head_dim={m.head_dim} with num_heads={m.num_heads} must multiply to d_model={m.d_model} "
                f"(GPT-2 has no head_dim setting)"]
    return []


def rules(m: ModelConfig) -> list[Rule]:
    d, f, v, p = m.d_model, m.ff_dim, m.vocab_size, m.positions
    out = [Rule("transformer.wte.weight", (v, d), ("token_embed/embedding",)),
           Rule("transformer.wpe.weight", (p, d), ("pos_embed/embedding",))]
    for i in range(m.num_layers):
        h, o = f"transformer.h.{i}.", f"layers_{i}/"
        out += [
            Rule(h + "ln_1.weight", (d,), (o + "attn_norm/scale",)),
            Rule(h + "ln_1.bias", (d,), (o + "attn_norm/bias",)),
            Rule(h + "attn.c_attn.weight", (d, 3 * d),
                 (o + "attn/q_kernel", o + "attn/k_kernel", o + "attn/v_kernel"), "split3"),
            Rule(h + "attn.c_attn.bias", (3 * d,), (o + "attn/q_bias", o + "attn/k_bias", o + "attn/v_bias"),
                 "split3"),
            Rule(h + "attn.c_proj.weight", (d, d), (o + "attn/o_kernel",)),  # Conv1D (in = H*Dh, out = D)
            Rule(h + "attn.c_proj.bias", (d,), (o + "attn/o_bias",)),
            Rule(h + "ln_2.weight", (d,), (o + "mlp_norm/scale",)),
            Rule(h + "ln_2.bias", (d,), (o + "mlp_norm/bias",)),
            Rule(h + "mlp.c_fc.weight", (d, f), (o + "mlp/up_kernel",)),  # Conv1D (in, out) = our kernel
            Rule(h + "mlp.c_fc.bias", (f,), (o + "mlp/up_bias",)),
            Rule(h + "mlp.c_proj.weight", (f, d), (o + "mlp/down_kernel",)),
            Rule(h + "mlp.c_proj.bias", (d,), (o + "mlp/down_bias",)),
        ]
    out += [Rule("transformer.ln_f.weight", (d,), ("final_norm/scale",)),
            Rule("transformer.ln_f.bias", (d,), ("final_norm/bias",))]
    n = m.num_labels
    if m.task == "sequence_classification":  # score: nn.Linear without bias
        out.append(Rule("score.weight", (n, d), ("classifier/kernel",), "transpose"))
    elif m.task == "token_classification":
        out += [Rule("classifier.weight", (n, d), ("classifier/kernel",), "transpose"),
                Rule("classifier.bias", (n,), ("classifier/bias",))]
    elif not m.tied:
        out.append(Rule("lm_head.weight", (v, d), ("lm_head/kernel",), "transpose"))  # nn.Linear (out, in)
    return out
