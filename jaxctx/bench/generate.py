"""`jaxctx bench generate`: prefill and decode tokens/s of KV-cache generation, beside transformers' generate.

For each (batch, prompt length): a random GPT-2 of the config's shapes is made in transformers (PyTorch), saved
and converted, so both sides hold the same weights; both decode greedily with exactly `new_tokens` tokens per
row (no EOS stop). Measured per side, medians over `repeats` after `warmup` (our compilation happens in warmup
and is reported apart):
- prefill: a generate call with max_new_tokens=1 (the prompt's forward pass filling the cache, and the first
  token), on both sides, so host overheads count alike;
- total: the generate call with new_tokens;
- decode = total - prefill: the new_tokens - 1 one-token steps, reported as decode tokens/s = batch *
  (new_tokens - 1) / decode seconds.
The first new-token index where the two sides' tokens differ is reported too (None: identical).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from jaxctx import config as config_lib
from jaxctx.bench.machine import machine_info
from jaxctx.errors import UsageError


@dataclass(frozen=True)
class GenerateBenchConfig:
    config: str | None
    overrides: tuple[str, ...]
    batches: tuple[int, ...]
    prompts: tuple[int, ...]
    new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    compare_hf: bool = True
    threads: int | None = None

    def validated(self) -> "GenerateBenchConfig":
        if self.new_tokens < 2:
            raise UsageError(f"--new-tokens {self.new_tokens} must be >= 2 (decode speed needs one-token steps)")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(f"--repeats {self.repeats} must be >= 1 and --warmup {self.warmup} >= 0")
        if not self.batches or not self.prompts or min(self.batches + self.prompts) < 1:
            raise UsageError("--batches and --prompts need positive integers, e.g. --batches 1,8 --prompts 512")
        model = config_lib.load(self.config, list(self.overrides)).model
        if model.family != "gpt2":
            raise UsageError(f"bench generate compares against transformers' GPT2LMHeadModel, so it needs "
                             f"model.family=gpt2, got {model.family!r}")
        return self


def _median_time(call: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, Any]:
    for _ in range(warmup):
        call()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _row(impl: str, batch: int, prompt: int, new: int, prefill_s: float, total_s: float, **extra) -> dict:
    decode_s = total_s - prefill_s  # too small to resolve (a tiny model) -> no rate rather than a wild one
    rate = batch * (new - 1) / decode_s if decode_s > 1e-3 else None
    return {"label": f"{impl} B={batch}", "impl": impl, "batch": batch, "prompt": prompt, "new_tokens": new,
            "prefill_s": prefill_s, "prefill_tokens_per_s": batch * prompt / prefill_s, "total_s": total_s,
            "decode_s": decode_s, "decode_tokens_per_s": rate, **extra}


def _first_difference(ours: np.ndarray, theirs: np.ndarray) -> int | None:
    """The first new-token index where any row differs (None: identical). Random weights make near-ties in the
    logits, where float rounding can flip an argmax and the rows then diverge."""
    differs = np.any(ours != theirs, axis=0)
    return int(np.argmax(differs)) if differs.any() else None


def run_generate_bench(cfg: GenerateBenchConfig, progress: Callable[[str], None] = print,
                       on_row: Callable[[dict], None] | None = None) -> dict:
    """The sweep -> {"bench": "generate", "machine", "config", "rows", "ratios"}."""
    import jax
    import torch

    from jaxctx.bench.hf_gpt2 import hf_config
    from jaxctx.convert.api import from_hf
    from jaxctx.generate import decoder
    from jaxctx.generate.generator import Generator
    from jaxctx.generate.settings import GenerationSettings

    model_cfg = config_lib.load(cfg.config, list(cfg.overrides)).model
    longest = max(cfg.prompts) + cfg.new_tokens
    model_cfg = dataclasses.replace(model_cfg, max_positions=longest)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = {"bench": "generate", "machine": machine_info(), "rows": [],
              "config": {"config": cfg.config, "overrides": list(cfg.overrides), "new_tokens": cfg.new_tokens,
                         "layers": model_cfg.num_layers, "d_model": model_cfg.d_model, "heads": model_cfg.num_heads,
                         "vocab": model_cfg.vocab_size, "repeats": cfg.repeats, "warmup": cfg.warmup},
              "timing": f"median of {cfg.repeats} after {cfg.warmup} warmup; decode = total - prefill",
              "ratios": {}}
    try:
        torch.manual_seed(0)
        import transformers

        hf_cfg = hf_config(model_cfg, longest)
        hf_cfg.use_cache = True
        hf = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            jcfg, params = from_hf(tmp)
        gen = Generator(jcfg, params)
        settings = GenerationSettings(max_new_tokens=cfg.new_tokens)  # no end ids: every row runs to the end
        result["config"]["params"] = int(sum(p.numel() for p in hf.parameters()))
        for batch in cfg.batches:
            for prompt in cfg.prompts:
                ids = np.random.default_rng(batch * 100003 + prompt).integers(
                    0, model_cfg.vocab_size, (batch, prompt)).astype(np.int32)
                progress(f"generate: batch {batch}, prompt {prompt}, {cfg.new_tokens} new tokens")
                start = time.perf_counter()
                gen.generate(list(ids), settings)  # compiles the loop
                compile_s = time.perf_counter() - start
                first = settings.replace(max_new_tokens=1)
                prefill_s, _ = _median_time(lambda: gen.generate(list(ids), first), cfg.repeats, cfg.warmup + 1)
                total_s, ours = _median_time(lambda: gen.generate(list(ids), settings), cfg.repeats, cfg.warmup)
                row = _row("jaxctx", batch, prompt, cfg.new_tokens, prefill_s, total_s, compile_s=compile_s,
                           prompt_bucket=decoder.bucket_length(prompt))
                if cfg.compare_hf:
                    tensor = torch.as_tensor(ids, dtype=torch.long)

                    def hf_generate(n):
                        with torch.no_grad():
                            return hf.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False, pad_token_id=0)

                    hf_prefill_s, _ = _median_time(lambda: hf_generate(1), cfg.repeats, cfg.warmup)
                    hf_total_s, theirs = _median_time(lambda: hf_generate(cfg.new_tokens), cfg.repeats, cfg.warmup)
                    hf_row = _row("transformers", batch, prompt, cfg.new_tokens, hf_prefill_s, hf_total_s,
                                  torch_threads=torch.get_num_threads())
                    row["first_difference"] = hf_row["first_difference"] = _first_difference(
                        np.asarray([c.token_ids for c in ours]), theirs[:, prompt:].numpy())
                    key = f"b{batch}_p{prompt}"
                    if row["decode_tokens_per_s"] and hf_row["decode_tokens_per_s"]:
                        result["ratios"][f"decode_{key}"] = round(row["decode_tokens_per_s"] /
                                                                  hf_row["decode_tokens_per_s"], 2)
                    result["ratios"][f"prefill_{key}"] = round(row["prefill_tokens_per_s"] /
                                                               hf_row["prefill_tokens_per_s"], 2)
                    row["decode_speedup_vs_hf"] = result["ratios"].get(f"decode_{key}")
                    result["rows"] += [row, hf_row]
                else:
                    result["rows"].append(row)
                if on_row is not None:
                    on_row(result)
    finally:
        torch.set_num_threads(previous_threads)
    return result
