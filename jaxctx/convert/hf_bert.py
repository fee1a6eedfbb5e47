"""BERT (transformers `BertForMaskedLM`) <-> jaxctx family "bert".

Weight layout, the one place it is handled (`rules`): every BERT projection is a torch nn.Linear, weight
(out, in), so each is transposed ("transpose") to our (in, out) kernel and reshaped into heads:
- `attention.self.{query,key,value}.weight` [H*Dh, D] -> {q,k,v}_kernel [D, H, Dh]; biases [H*Dh] -> [H, Dh].
- `attention.output.dense.weight` [D, H*Dh] -> o_kernel [H, Dh, D].
- `intermediate.dense` / `output.dense` -> mlp up_kernel [D, F] / down_kernel [F, D];
  `cls.predictions.transform.dense` -> mlm_head/dense_kernel [D, D].
- LayerNorms {weight, bias} -> {scale, bias}: embeddings.LayerNorm -> embed_norm, attention.output.LayerNorm ->
  attn_norm, output.LayerNorm -> mlp_norm, cls.predictions.transform.LayerNorm -> mlm_head/norm.
- The MLM decoder is tied to the word embeddings; its bias is `cls.predictions.bias` -> mlm_head/output_bias.

- BertForPreTraining (or any MLM checkpoint with `cls.seq_relationship`): model.nsp_head; `bert.pooler.dense` ->
  pooler/{kernel,bias}, `cls.seq_relationship.{weight [2, D], bias}` -> nsp_head/{kernel [D, 2], bias}; exported
  back as BertForPreTraining.
- BertForSequenceClassification: the pooler and `classifier.{weight [N, D], bias}` -> classifier/{kernel, bias};
  BertForTokenClassification: the classifier only (no pooler). No MLM head in either.

On import, the TF-era names `LayerNorm.gamma` / `LayerNorm.beta` are read as weight / bias; the buffers
`position_ids` / `token_type_ids` are dropped, and so (with a warning) is a pooler the model has no use for;
`cls.predictions.decoder.{weight,bias}`, if present, must equal the word embeddings / `cls.predictions.bias` they
are tied to.
"""

from __future__ import annotations

import re

from jaxctx.config import ModelConfig
from jaxctx.convert.mapping import HFConfig, Rule, task_from_hf, task_to_hf

MODEL_TYPE = "bert"
TASK_ARCHITECTURES = {"BertForMaskedLM": "lm", "BertForPreTraining": "lm",
                      "BertForSequenceClassification": "sequence_classification",
                      "BertForTokenClassification": "token_classification"}  # architecture -> model.task
ARCHITECTURES = tuple(TASK_ARCHITECTURES)
EXPORT_ARCHITECTURE = "BertForMaskedLM"
EXPORT_ARCHITECTURES = {"lm": EXPORT_ARCHITECTURE, "sequence_classification": "BertForSequenceClassification",
                        "token_classification": "BertForTokenClassification"}
AUTO_CLASS = "AutoModelForMaskedLM"
CARRY_KEYS = ("bos_token_id", "eos_token_id", "sep_token_id", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "classifier_dropout")
IGNORED = re.compile(r"bert\.embeddings\.(position_ids|token_type_ids)")  # buffers
# Heads a checkpoint may carry that the configured model does not have (warned, then dropped): a pooler without a
# next-sentence head, or a token-classification checkpoint saved with one.
DROPPED = re.compile(r"bert\.pooler\..*|cls\.seq_relationship\..*")
NSP_TENSOR = "cls.seq_relationship.weight"


def architecture(m: ModelConfig) -> str:
    return "BertForPreTraining" if m.nsp_head else EXPORT_ARCHITECTURES[m.task]


def with_tensors(fields: dict, names: set[str]) -> dict:
    """A language model whose checkpoint has the next-sentence head (BertForPreTraining, or the original
    bert-base checkpoints labelled BertForMaskedLM) keeps it: model.nsp_head, with the pooler."""
    if fields.get("task", "lm") == "lm" and NSP_TENSOR in names and "bert.pooler.dense.weight" in names:
        return {**fields, "nsp_head": True}
    return fields


def canonical(name: str) -> str:
    """TF-era LayerNorm names (gamma/beta) -> weight/bias."""
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


def tied_copies(m: ModelConfig) -> dict[str, str]:
    return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}


def config_from_hf(hf: dict, where: str) -> dict:
    c = HFConfig(hf, where)
    d, heads = c.require("hidden_size"), c.require("num_attention_heads")
    fields = dict(
        family="bert", d_model=d, num_heads=heads, num_layers=c.require("num_hidden_layers"),
        d_ff=c.require("intermediate_size"), vocab_size=c.require("vocab_size"),
        max_positions=c.require("max_position_embeddings"), type_vocab_size=c.require("type_vocab_size"),
        norm_eps=float(c.get("layer_norm_eps", 1e-12)), initializer_range=float(c.get("initializer_range", 0.02)),
        pad_token_id=int(c.get("pad_token_id", 0)), dropout=c.rate("hidden_dropout_prob", 0.1),
        attention_dropout=c.rate("attention_probs_dropout_prob", 0.1),  # HF BertConfig defaults
        **task_from_hf(c, TASK_ARCHITECTURES))
    if d % heads:
        c.unsupported(f"hidden_size={d} is not divisible by num_attention_heads={heads}")
    c.expect("hidden_act", ("gelu", "gelu_python"), "gelu")  # exact (erf) GELU
    c.expect("position_embedding_type", ("absolute",), "absolute")
    c.expect("is_decoder", (False,), False)
    c.expect("add_cross_attention", (False,), False)
    c.expect("tie_word_embeddings", (True,), True)
    c.done()
    return fields


def config_to_hf(m: ModelConfig) -> dict:
    """ModelConfig -> config.json keys (max_positions becomes max_position_embeddings)."""
    return {
        **task_to_hf(m), "model_type": MODEL_TYPE, "architectures": [architecture(m)],
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "intermediate_size": m.ff_dim, "hidden_act": "gelu",
        "max_position_embeddings": m.positions, "type_vocab_size": m.type_vocab_size,
        "layer_norm_eps": m.eps, "initializer_range": m.initializer_range, "pad_token_id": m.pad_token_id,
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "is_decoder": False,
        "hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.attention_dropout,
    }


def export_problems(m: ModelConfig) -> list[str]:
    if m.dim_per_head * m.num_heads != m.d_model:
        return [f"model.head_dim={m.head_dim} with num_heads={m.num_heads} must multiply to d_model={m.d_model} "
                f"(BERT has no head_dim setting)"]
    return []


def rules(m: ModelConfig) -> list[Rule]:
    d, f, v, p, tv = m.d_model, m.ff_dim, m.vocab_size, m.positions, m.type_vocab_size
    e = "bert.embeddings."
    out = [Rule(e + "word_embeddings.weight", (v, d), ("token_embed/embedding",)),
           Rule(e + "position_embeddings.weight", (p, d), ("pos_embed/embedding",)),
           Rule(e + "token_type_embeddings.weight", (tv, d), ("type_embed/embedding",)),
           Rule(e + "LayerNorm.weight", (d,), ("embed_norm/scale",)),
           Rule(e + "LayerNorm.bias", (d,), ("embed_norm/bias",))]
    for i in range(m.num_layers):
        h, o = f"bert.encoder.layer.{i}.", f"layers_{i}/"
        for hf_name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            out += [Rule(h + f"attention.self.{hf_name}.weight", (d, d), (o + f"attn/{ours}_kernel",), "transpose"),
                    Rule(h + f"attention.self.{hf_name}.bias", (d,), (o + f"attn/{ours}_bias",))]
        out += [
            Rule(h + "attention.output.dense.weight", (d, d), (o + "attn/o_kernel",), "transpose"),
            Rule(h + "attention.output.dense.bias", (d,), (o + "attn/o_bias",)),
            Rule(h + "attention.output.LayerNorm.weight", (d,), (o + "attn_norm/scale",)),
            Rule(h + "attention.output.LayerNorm.bias", (d,), (o + "attn_norm/bias",)),
            Rule(h + "intermediate.dense.weight", (f, d), (o + "mlp/up_kernel",), "transpose"),
            Rule(h + "intermediate.dense.bias", (f,), (o + "mlp/up_bias",)),
            Rule(h + "output.dense.weight", (d, f), (o + "mlp/down_kernel",), "transpose"),
            Rule(h + "output.dense.bias", (d,), (o + "mlp/down_bias",)),
            Rule(h + "output.LayerNorm.weight", (d,), (o + "mlp_norm/scale",)),
            Rule(h + "output.LayerNorm.bias", (d,), (o + "mlp_norm/bias",)),
        ]
    pooler = [Rule("bert.pooler.dense.weight", (d, d), ("pooler/kernel",), "transpose"),
              Rule("bert.pooler.dense.bias", (d,), ("pooler/bias",))]
    if m.task != "lm":  # BertFor{Sequence,Token}Classification: classifier [N, D] + bias; the pooler for sequences
        n = m.num_labels
        if m.task == "sequence_classification":
            out += pooler
        return out + [Rule("classifier.weight", (n, d), ("classifier/kernel",), "transpose"),
                      Rule("classifier.bias", (n,), ("classifier/bias",))]
    c = "cls.predictions."
    out += [Rule(c + "transform.dense.weight", (d, d), ("mlm_head/dense_kernel",), "transpose"),
            Rule(c + "transform.dense.bias", (d,), ("mlm_head/dense_bias",)),
            Rule(c + "transform.LayerNorm.weight", (d,), ("mlm_head/norm/scale",)),
            Rule(c + "transform.LayerNorm.bias", (d,), ("mlm_head/norm/bias",)),
            Rule(c + "bias", (v,), ("mlm_head/output_bias",))]
    if m.nsp_head:  # BertForPreTraining: pooler + next-sentence classifier
        out += pooler + [Rule("cls.seq_relationship.weight", (2, d), ("nsp_head/kernel",), "transpose"),
                         Rule("cls.seq_relationship.bias", (2,), ("nsp_head/bias",))]
    return out
