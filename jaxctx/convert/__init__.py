"""Hugging Face conversion, both directions, through the on-disk format (config.json + safetensors).

    cfg, params = jaxctx.convert.from_hf(hf_dir)            # GPT2LMHeadModel, BertForMaskedLM, LlamaForCausalLM
    jaxctx.convert.to_hf(cfg, params, out_dir)              # loads with transformers' Auto*.from_pretrained

Modules, one job each:
  api.py        from_hf / to_hf, and the directory-to-directory jobs behind `jaxctx convert from-hf|to-hf`
  hf_gpt2.py    GPT-2 config map and tensor rules (Conv1D layout, fused c_attn)
  hf_bert.py    BERT config map and tensor rules (nn.Linear layout, MLM head)
  hf_llama.py   LLaMA config map and tensor rules (GQA, tied/untied head, RoPE parameters)
  mapping.py    the layout transforms (same / transpose / split3), tree helpers, checks, position-table resizing
  io.py         safetensors directories (single/sharded, f32/bf16/f16), pickle refusal, atomic output, tokenizers
  errors.py     error types (ValueError / FileNotFoundError subclasses)
  cli.py        argument parsing (no jax at import)

Names are imported lazily so that `jaxctx --help` (which imports jaxctx.convert.cli) stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "from_hf": "jaxctx.convert.api",
    "to_hf": "jaxctx.convert.api",
    "import_checkpoint": "jaxctx.convert.api",
    "export_checkpoint": "jaxctx.convert.api",
    "FAMILIES": "jaxctx.convert.api",
    "ConvertError": "jaxctx.convert.errors",
    "HFFileNotFoundError": "jaxctx.convert.errors",
    "PickleCheckpointError": "jaxctx.convert.errors",
    "UnsupportedModelError": "jaxctx.convert.errors",
    "TensorMismatchError": "jaxctx.convert.errors",
    "OutputExistsError": "jaxctx.convert.errors",
    "TokenizerNotFoundError": "jaxctx.convert.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxctx.convert' has no attribute {name!r}")
