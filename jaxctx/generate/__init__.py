"""Generation with a key/value cache: greedy, sampling (temperature, top-k, top-p), repetition penalty, beam search.

    from jaxctx.generate import Generator, GenerationSettings
    gen = Generator(cfg, params)
    [out] = gen.generate([prompt_ids], GenerationSettings(max_new_tokens=32, eos_ids=(tokenizer.special.eos,)))

Modules: settings (the knobs, transformers' semantics), processors (logits processing), decoder (cache,
prefill, one-token step, greedy/sampling loop), beam (beam search), generator (batching and compiled loops),
loading (a checkpoint or HF directory + its tokenizer), cli (`jaxctx generate`).
"""

from jaxctx.generate.generator import Completion, Generator
from jaxctx.generate.settings import GenerateError, GenerationSettings

__all__ = ["Completion", "GenerateError", "GenerationSettings", "Generator"]
