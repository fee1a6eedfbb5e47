"""Generation with a key/value cache: greedy, sampling (temperature, top-k, top-p), repetition penalty, beam search.

    from jaxctx.generate import Generator, GenerationSettings
    gen = Generator(cfg, params)
    [out] = gen.generate([prompt_ids], GenerationSettings(max_new_tokens=32, eos_ids=(tokenizer.special.eos,)))
    out.token_ids, out.finish_reason

Modules, one job each:
  settings.py    the knobs, with transformers' semantics, validated
  processors.py  logits processing (repetition penalty, temperature, top-k, top-p) and the token choice
  decoder.py     the cache, prefill, the one-token step, the greedy / sampling loop
  beam.py        beam search (transformers' vectorised algorithm)
  generator.py   `Generator`: batching prompts into compiled loops
  loading.py     a checkpoint / workdir or HF directory + its tokenizer, for every inference command
  cli.py         `jaxctx generate` (no jax at import)

Names are imported lazily so that `jaxctx --help` (which imports jaxctx.generate.cli) stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Completion": "jaxctx.generate.generator",
    "Generator": "jaxctx.generate.generator",
    "GenerateError": "jaxctx.generate.settings",
    "GenerationSettings": "jaxctx.generate.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxctx.generate' has no attribute {name!r}")
