"""Hugging Face `GPT2LMHeadModel` (PyTorch) trained on the same shapes: the side-by-side baseline of `bench train`.

The HF model is built from a `GPT2Config` mirroring the jaxctx config (layers, width, heads, MLP width, vocab,
positions, epsilon, tied head) with random init: nothing is downloaded. Its step does what the jaxctx step does:
forward with `labels` (HF shifts them internally), backward, global-norm clipping, `torch.optim.AdamW`.
Attention is `attn_implementation="sdpa"` (PyTorch's fused scaled_dot_product_attention). Dropout is set to 0
because jaxctx models have none; HF's default 0.1 would only make the baseline slower.

torch and transformers are imported only when this runs (`--compare-hf`), never by `import jaxctx`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from jaxctx.config import ModelConfig
from jaxctx.errors import UsageError


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as err:  # pragma: no cover - both are installed in the test environment
        raise UsageError(f"--compare-hf needs PyTorch and transformers ({err}); pip install torch transformers") \
            from None
    return torch, transformers


def hf_config(model: ModelConfig, seq_len: int):
    """The `GPT2Config` with the jaxctx model's shapes (gpt2 family only)."""
    if model.family != "gpt2":
        raise UsageError(f"--compare-hf compares against HF GPT2LMHeadModel, so it needs model.family=gpt2, got "
                         f"{model.family!r}")
    if model.dim_per_head * model.num_heads != model.d_model:
        raise UsageError(f"--compare-hf: GPT-2 needs d_model = heads x head_dim, got {model.d_model} != "
                         f"{model.num_heads} x {model.dim_per_head}")
    _, transformers = _import_torch()
    return transformers.GPT2Config(
        vocab_size=model.vocab_size, n_positions=max(seq_len, model.max_positions or seq_len),
        n_embd=model.d_model, n_layer=model.num_layers, n_head=model.num_heads, n_inner=model.ff_dim,
        activation_function="gelu_new", layer_norm_epsilon=model.eps, initializer_range=model.initializer_range,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=model.tied,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )


def measure_hf_gpt2(model: ModelConfig, *, seq_len: int, batch: int, repeats: int, warmup: int,
                    threads: int | None = None, learning_rate: float = 3e-4, seed: int = 0) -> dict[str, Any]:
    """Median train-step time of HF GPT2LMHeadModel (PyTorch CPU, sdpa, AdamW) at [batch, seq_len].

    Returns {"step_ms", "step_min_ms", "step_times_ms", "tokens_per_s", "loss", "params", "torch_version",
    "transformers_version", "threads", "attn_implementation"}.
    """
    torch, transformers = _import_torch()
    config = hf_config(model, seq_len)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        net = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.vocab_size, (batch, seq_len), generator=generator)

        def step() -> float:
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())  # forces completion (CPU torch is synchronous anyway)

        for _ in range(warmup):
            step()
        times, loss = [], float("nan")
        for _ in range(repeats):
            start = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return {
            "step_ms": median * 1e3, "step_min_ms": min(times) * 1e3, "step_times_ms": [t * 1e3 for t in times],
            "tokens_per_s": batch * seq_len / median, "loss": loss,
            "params": sum(p.numel() for p in net.parameters()),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "threads": torch.get_num_threads(), "attn_implementation": net.config._attn_implementation,
        }
    finally:
        torch.set_num_threads(previous_threads)
