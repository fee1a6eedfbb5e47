"""The hardware columns of a metrics row: model FLOPs utilisation and device memory in use.

MFU uses the bench's convention (`jaxctx.bench.flops.TRAIN_FLOP_CONVENTION`: 6N + the causal-halved attention
term per trained token) against a peak FLOP rate:
- `train.peak_tflops` when set (TFLOP/s per device; a CPU host counts once however many fake devices it shows);
- else the data-sheet dense peak of the device kind at `model.dtype` (`jaxctx.bench.machine.PEAK_TFLOPS`);
- else none (CPU, or a kind the table lacks): the row has no `mfu` rather than a guess.
Memory: `device.memory_stats()` of this process's devices (largest `bytes_in_use` and `peak_bytes_in_use`); CPU
backends report nothing, and the columns are then left out.
"""

from __future__ import annotations

import jax

from jaxctx.bench.flops import matmul_param_count, train_flops_per_token
from jaxctx.bench.machine import known_peak_tflops

MIB = 1 << 20


def flops_per_token(cfg, abstract_params) -> float:
    """Model FLOPs of one trained token (forward + backward) of `cfg`'s model at `data.seq_len`."""
    m = cfg.model
    counts = matmul_param_count(abstract_params, vocab_size=m.vocab_size, d_model=m.d_model, tied=m.tied)
    return train_flops_per_token(counts["matmul"], num_layers=m.num_layers, heads=m.num_heads,
                                 head_dim=m.dim_per_head, seq_len=cfg.data.seq_len, causal=m.causal)["total"]


def peak_flops(cfg, devices: list) -> tuple[float | None, str]:
    """(FLOP/s that MFU divides by for the whole mesh, where the number comes from); (None, why) if unknown."""
    backend, kind = devices[0].platform, devices[0].device_kind
    counted = 1 if backend == "cpu" else len(devices)  # fake CPU devices share one host's cores
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops * 1e12 * counted, f"train.peak_tflops={cfg.train.peak_tflops:g} x {counted}"
    peak = None if backend == "cpu" else known_peak_tflops(kind, cfg.model.dtype)
    if peak is None:
        return None, f"no peak FLOP rate for {kind} ({cfg.model.dtype}); set train.peak_tflops for an mfu column"
    return peak * 1e12 * counted, f"data-sheet peak of {kind} ({cfg.model.dtype}) x {counted}"


def memory_columns(devices) -> dict:
    """{"memory_in_use_mib", "memory_peak_mib"}: the largest over `devices` that report memory; {} if none does."""
    in_use, peak = [], []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats:
            if "bytes_in_use" in stats:
                in_use.append(int(stats["bytes_in_use"]))
            if "peak_bytes_in_use" in stats:
                peak.append(int(stats["peak_bytes_in_use"]))
    out = {}
    if in_use:
        out["memory_in_use_mib"] = round(max(in_use) / MIB, 1)
    if peak:
        out["memory_peak_mib"] = round(max(peak) / MIB, 1)
    return out


class Throughput:
    """Adds `mfu` and device memory to a row that has `tokens_per_sec` (see the module docstring)."""

    def __init__(self, cfg, abstract_params, mesh_devices: list):
        self.flops_per_token = flops_per_token(cfg, abstract_params)
        self.peak, self.peak_source = peak_flops(cfg, mesh_devices)
        self.local_devices = [d for d in mesh_devices if d.process_index == jax.process_index()]

    def columns(self, tokens_per_sec: float) -> dict:
        out = {}
        if self.peak:
            out["mfu"] = tokens_per_sec * self.flops_per_token / self.peak
        out.update(memory_columns(self.local_devices))
        return out
