"""Dropout rates travel with conversion: HF config -> model.dropout / model.attention_dropout -> HF config."""

import json

import pytest
import transformers

from jaxctx.config import ModelConfig
from jaxctx.convert import from_hf, to_hf
from jaxctx.convert import hf_bert, hf_gpt2, hf_llama
from jaxctx.convert.errors import UnsupportedModelError

FAMILIES = {
    # family: (module, HF config, its keys for (hidden, attention), HF's own defaults)
    "gpt2": (hf_gpt2, transformers.GPT2Config, ("resid_pdrop", "attn_pdrop"), (0.1, 0.1)),
    "bert": (hf_bert, transformers.BertConfig, ("hidden_dropout_prob", "attention_probs_dropout_prob"), (0.1, 0.1)),
    "llama": (hf_llama, transformers.LlamaConfig, (None, "attention_dropout"), (0.0, 0.0)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_defaults_and_custom_rates_both_ways(family):
    module, config_cls, (hidden, attn), defaults = FAMILIES[family]
    small = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16) if family != "gpt2" else \
        dict(n_layer=1, n_head=2, n_embd=16)
    fields = module.config_from_hf(config_cls(**small).to_dict(), "config.json")
    assert (fields.get("dropout", 0.0), fields["attention_dropout"]) == defaults  # HF's defaults come through
    custom = {attn: 0.25, **({hidden: 0.15} if hidden else {})}
    fields = module.config_from_hf(config_cls(**small, **custom).to_dict(), "config.json")
    assert fields["attention_dropout"] == 0.25 and fields.get("dropout", 0.0) == (0.15 if hidden else 0.0)
    exported = module.config_to_hf(ModelConfig(**fields))
    assert exported[attn] == 0.25 and (hidden is None or exported[hidden] == 0.15)
    if family == "gpt2":
        assert exported["embd_pdrop"] == 0.15  # one jaxctx rate for embeddings and residuals


def test_rate_out_of_range_is_named():
    hf = transformers.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                 attention_probs_dropout_prob=1.5).to_dict()
    with pytest.raises(UnsupportedModelError, match=r"attention_probs_dropout_prob=1.5 must be a dropout probability"):
        hf_bert.config_from_hf(hf, "config.json")


def test_from_hf_then_to_hf_keeps_the_rates(hf, tmp_path):
    path = hf.save(hf.model("bert", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.05), tmp_path / "in")
    cfg, params = from_hf(path)
    assert (cfg.model.dropout, cfg.model.attention_dropout) == (0.2, 0.05)
    to_hf(cfg, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_dropout_prob"], config["attention_probs_dropout_prob"]) == (0.2, 0.05)
