"""The train-step sweep behind `jaxctx bench train`: the real step of a config across sequence lengths.

For each variant (block size x remat policy, or just the config) and each length T, the config is set to T
(`trainstep.config_at`), its jitted step compiled ahead of time, its compiled memory read, and, if it fits the
budget, the step run on a synthetic batch: median step time after warm-up, tokens/s, model FLOP/s and MFU
(`flops.TRAIN_FLOP_CONVENTION`) against the device peak (`machine.device_peak`: the matmul measured in this run on
CPU). By default the tokens per step are held constant by scaling the batch (B = tokens_per_step / T), so lengths
compare at equal work per step; `batch` fixes B instead.

`compare_hf` (gpt2 only) also times Hugging Face `GPT2LMHeadModel` in PyTorch at the same [B, T]
(`jaxctx.bench.hf_gpt2`) and reports our speed-up over it.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import jax

from jaxctx import config as config_lib
from jaxctx.bench.attention import check_seq_lens
from jaxctx.bench.flops import TRAIN_FLOP_CONVENTION, train_flops_per_token
from jaxctx.bench.machine import device_peak, machine_info, matmul_rate, memory_budget, peak_device_memory_bytes, \
    usable_cpu_count
from jaxctx.bench import step_profile
from jaxctx.bench.measure import GIB, format_bytes, mib, profiler_trace, sig
from jaxctx.bench.trainstep import StepProgram, compile_step, config_at, pick_devices
from jaxctx.ops.attention import resolve_impl
from jaxctx.parallel import mesh_shape
from jaxctx.errors import UsageError
from jaxctx.platform import check_platform

SCHEMA_VERSION = 1
JAXCTX = "jaxctx"  # `impl` of our rows
HF = "hf-torch"  # `impl` of Hugging Face rows

MEMORY_CONVENTION = ("compiled memory per device from Compiled.memory_analysis(): total = arguments + outputs - "
                     "aliased (donated state) + temp; temp holds activations, gradients and optimizer temporaries")


@dataclasses.dataclass(frozen=True)
class TrainBenchConfig:
    """One `bench train` sweep."""

    config: str | None  # YAML experiment file (None = the embedded default)
    seq_lens: tuple[int, ...]  # T values
    overrides: tuple[str, ...] = ()  # --set section.key=value, applied before the sweep's own settings
    tokens_per_step: int | None = None  # constant tokens per step (B = tokens / T); None = max(T) x data-parallel
    batch: int | None = None  # fixed global batch instead of constant tokens
    block_sizes: tuple[int, ...] | None = None  # sweep attention_block_q = attention_block_k over these
    remat_policies: tuple[str, ...] | None = None  # sweep model.remat_policy over these
    repeats: int = 3  # timed steps; the median is reported
    warmup: int = 1  # untimed steps first (the first call also pays one-off allocation)
    devices: int | None = None  # use the first N devices (None = all)
    max_temp_gb: float | None = None  # skip configurations whose compiled total memory exceeds this (GiB)
    matmul_size: int | None = None  # n of the CPU matmul reference (None = machine default)
    compare_hf: bool = False  # also time HF GPT2LMHeadModel (PyTorch) on the same shapes
    trace_dir: str | None = None  # jax.profiler trace of `trace_steps` steps per configuration
    trace_steps: int = 3
    profile: bool = False  # op time by HLO category from a trace of `trace_steps` steps (jaxctx.bench.step_profile)

    def validated(self) -> "TrainBenchConfig":
        seq_lens = check_seq_lens(self.seq_lens)
        positive = {"repeats": self.repeats}
        for name in ("tokens_per_step", "batch", "devices", "matmul_size"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        if self.trace_dir is not None or self.profile:
            positive["trace_steps"] = self.trace_steps
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"--warmup must be a non-negative integer, got {self.warmup!r}")
        if self.tokens_per_step is not None and self.batch is not None:
            raise UsageError("give --tokens-per-step (batch scaled with T) or --batch (fixed), not both")
        if self.block_sizes is not None:
            if not self.block_sizes:
                raise UsageError("--block-sizes is empty; give positive integers, e.g. 256,512")
            for b in self.block_sizes:
                if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
                    raise UsageError(f"--block-sizes: {b!r} is not a positive integer")
        if self.remat_policies is not None:
            if not self.remat_policies:
                raise UsageError(f"--remat-policies is empty; choose from {', '.join(config_lib.REMAT_POLICIES)}")
            for p in self.remat_policies:
                if p not in config_lib.REMAT_POLICIES:
                    raise UsageError(f"--remat-policies: unknown policy {p!r}; valid: "
                                     f"{', '.join(config_lib.REMAT_POLICIES)}")
        if self.max_temp_gb is not None and not self.max_temp_gb > 0:
            raise UsageError(f"--max-temp-gb must be a positive number of GiB, got {self.max_temp_gb!r}")
        return dataclasses.replace(self, seq_lens=seq_lens, overrides=tuple(self.overrides))


def load_base_config(path: str | None, overrides) -> config_lib.Config:
    """The experiment config with --set overrides (validated); errors name the file and the key."""
    cfg = config_lib.load(path, list(overrides))
    check_platform(cfg)
    return cfg


def variants(cfg: TrainBenchConfig) -> list[tuple[str, dict[str, Any]]]:
    """[(label, model-field overrides)] for the block-size x remat-policy sweep; one unnamed variant without it."""
    blocks = cfg.block_sizes or (None,)
    policies = cfg.remat_policies or (None,)
    out = []
    for block in blocks:
        for policy in policies:
            parts, changes = [], {}
            if block is not None:
                parts.append(f"block={block}")
                changes.update(attention_block_q=block, attention_block_k=block)
            if policy is not None:
                parts.append(f"remat={policy}")
                changes["remat_policy"] = policy
            out.append((" ".join(parts) or JAXCTX, changes))
    return out


def batch_for(cfg: TrainBenchConfig, base: config_lib.Config, seq_len: int, n_devices: int) -> int:
    """Global batch at `seq_len`: fixed, or tokens_per_step / T; must split over data-parallel x grad_accum."""
    data, fsdp, *_ = mesh_shape(base.parallel, n_devices)
    unit = data * fsdp * base.train.grad_accum  # sequences one step must be divisible into
    if cfg.batch is not None:
        batch = cfg.batch
    else:
        tokens = cfg.tokens_per_step if cfg.tokens_per_step is not None else max(cfg.seq_lens) * unit
        if tokens % seq_len:
            raise UsageError(f"--tokens-per-step {tokens} is not a multiple of T={seq_len}; constant tokens per "
                             f"step needs every T to divide it (or give --batch)")
        batch = tokens // seq_len
    if batch % unit:
        raise UsageError(f"batch {batch} at T={seq_len} must be divisible by data-parallel size {data * fsdp} x "
                         f"train.grad_accum {base.train.grad_accum} = {unit}; adjust --tokens-per-step or --batch")
    return batch


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _time_steps(program: StepProgram, repeats: int, warmup: int, trace_dir: str | None,
                trace_steps: int) -> dict[str, Any]:
    """Run the compiled step (state donated each call) and time it; trace a few more steps afterwards."""
    state = program.init_state(program.cfg.train.seed)
    batch = program.device_batch(program.cfg.train.seed)
    metrics = None
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        state, metrics = program.compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if trace_dir is not None:
        with profiler_trace(trace_dir):
            for _ in range(trace_steps):
                state, metrics = program.compiled(state, batch)
                jax.block_until_ready((state, metrics))
    loss = float(jax.device_get(metrics["loss"]))
    del state, batch
    return {"times_s": times, "loss": loss}


def _base_row(label: str, impl: str, cfg: config_lib.Config) -> dict[str, Any]:
    m = cfg.model
    return {
        "variant": label, "impl": impl, "seq_len": cfg.data.seq_len, "batch": cfg.train.batch_size,
        "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        "attention": resolve_impl(m.attention, jax.numpy.dtype(m.dtype)) if impl == JAXCTX else "sdpa",
        "block_q": m.attention_block_q, "block_k": m.attention_block_k, "remat_policy": m.remat_policy,
        "mlp_chunk": m.mlp_chunk, "loss_chunk": m.loss_chunk, "scan_layers": m.scan_layers, "dtype": m.dtype,
        "status": "ok",
        "step_ms": None, "step_min_ms": None, "step_times_ms": None, "tokens_per_s": None,
        "flops_per_token": None, "flops_per_token_dense": None, "flops_per_token_attention": None,
        "model_tflop_per_step": None, "achieved_tflop_per_s": None, "mfu": None,
        "params_total": None, "params_matmul": None,
        "temp_mib": None, "argument_mib": None, "output_mib": None, "alias_mib": None, "total_mib": None,
        "total_bytes": None, "peak_device_mib": None, "host_max_rss_mib": None, "compile_s": None, "loss": None,
        "hf_tokens_per_s": None, "speedup_vs_hf": None, "trace": None,
    }


def _flops(cfg: config_lib.Config, matmul_params: int) -> dict[str, float]:
    m = cfg.model
    return train_flops_per_token(matmul_params, num_layers=m.num_layers, heads=m.num_heads,
                                 head_dim=m.dim_per_head, seq_len=cfg.data.seq_len, causal=m.causal)


def _fill_rates(row: dict[str, Any], times_s: list[float], flops: dict[str, float], peak_tflops: float | None):
    median = statistics.median(times_s)
    tokens = row["tokens_per_step"]
    model_flops = flops["total"] * tokens
    achieved = model_flops / median / 1e12
    row.update({"step_ms": sig(median * 1e3), "step_min_ms": sig(min(times_s) * 1e3),
                "step_times_ms": [sig(t * 1e3) for t in times_s], "tokens_per_s": sig(tokens / median),
                "model_tflop_per_step": sig(model_flops / 1e12), "achieved_tflop_per_s": sig(achieved),
                "mfu": sig(achieved / peak_tflops) if peak_tflops else None})


def _measure_jaxctx(label: str, cfg: config_lib.Config, bench: TrainBenchConfig, devices, budget: int | None,
                    peak_tflops: float | None) -> dict[str, Any]:
    row = _base_row(label, JAXCTX, cfg)
    try:
        program = compile_step(cfg, devices=devices)
    except Exception as err:  # a compile refusal is a result (e.g. a kernel that does not support a shape)
        row["status"] = f"error: compile failed: {_short_error(err)}"
        return row
    mem = program.memory
    flops = _flops(cfg, program.params["matmul"])
    row.update({"params_total": program.params["total"], "params_matmul": program.params["matmul"],
                "flops_per_token": sig(flops["total"]), "flops_per_token_dense": sig(flops["dense"]),
                "flops_per_token_attention": sig(flops["attention"]),
                "temp_mib": mib(mem.temp_bytes), "argument_mib": mib(mem.argument_bytes),
                "output_mib": mib(mem.output_bytes), "alias_mib": mib(mem.alias_bytes),
                "total_mib": mib(mem.total_bytes), "total_bytes": mem.total_bytes,
                "compile_s": round(program.compile_s, 2)})
    if budget is not None and mem.total_bytes is not None and mem.total_bytes > budget:
        row["status"] = f"skipped: needs {format_bytes(mem.total_bytes)} > budget {format_bytes(budget)}"
        return row
    trace_dir = scratch = None
    if bench.trace_dir is not None:
        trace_dir = os.path.join(bench.trace_dir, f"{label.replace(' ', '_').replace('=', '')}-T{cfg.data.seq_len}")
    elif bench.profile:  # a trace only for the breakdown: deleted once read
        trace_dir = scratch = tempfile.mkdtemp(prefix="jaxctx-profile-")
    try:
        timed = _time_steps(program, bench.repeats, bench.warmup, trace_dir, bench.trace_steps)
        if bench.profile:
            row["profile"] = step_profile.breakdown(trace_dir, program.compiled.as_text(), bench.trace_steps)
            row.update({f"op_share_{r['category'].replace('/', '_')}": r["share"]
                        for r in row["profile"]["categories"]})
    except Exception as err:  # e.g. a runtime OOM the analysis did not predict
        row["status"] = f"error: run failed: {_short_error(err)}"
        return row
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    _fill_rates(row, timed["times_s"], flops, peak_tflops)
    row.update({"loss": sig(timed["loss"]), "trace": None if scratch else trace_dir,
                "peak_device_mib": mib(peak_device_memory_bytes()), "host_max_rss_mib": mib(_max_rss_bytes())})
    return row


def _measure_hf(cfg: config_lib.Config, bench: TrainBenchConfig, peak_tflops: float | None,
                matmul_params: int | None) -> dict[str, Any]:
    from jaxctx.bench.hf_gpt2 import measure_hf_gpt2

    row = _base_row(HF, HF, cfg)
    row.update(attention="sdpa", block_q=None, block_k=None, remat_policy="none", mlp_chunk=0, loss_chunk=0,
               scan_layers=False, dtype="float32")
    try:
        hf = measure_hf_gpt2(cfg.model, seq_len=cfg.data.seq_len, batch=cfg.train.batch_size,
                             repeats=bench.repeats, warmup=bench.warmup, threads=usable_cpu_count(),
                             learning_rate=cfg.train.learning_rate, seed=cfg.train.seed)
    except ValueError:
        raise
    except Exception as err:  # a torch failure (e.g. out of memory) is a result, not a reason to lose the sweep
        row["status"] = f"error: run failed: {_short_error(err)}"
        return row
    if matmul_params:
        flops = _flops(cfg, matmul_params)  # same model, same convention
        row.update(flops_per_token=sig(flops["total"]), flops_per_token_dense=sig(flops["dense"]),
                   flops_per_token_attention=sig(flops["attention"]), params_matmul=matmul_params)
        _fill_rates(row, [t / 1e3 for t in hf["step_times_ms"]], flops, peak_tflops)
    else:
        row.update(step_ms=sig(hf["step_ms"]), tokens_per_s=sig(hf["tokens_per_s"]))
    row.update(params_total=hf["params"], loss=sig(hf["loss"]), host_max_rss_mib=mib(_max_rss_bytes()),
               hf=dict((k, hf[k]) for k in ("torch_version", "transformers_version", "threads",
                                               "attn_implementation")))
    return row


def _short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def run_train_bench(bench: TrainBenchConfig, *, progress: Callable[[str], None] = lambda line: None,
                    on_row: Callable[[dict], None] = lambda result: None) -> dict[str, Any]:
    """Run the sweep; return the JSON-ready result {"bench": "train", "machine", ..., "rows", "summary"}."""
    bench = bench.validated()
    base = load_base_config(bench.config, bench.overrides)
    if bench.compare_hf and base.model.family != "gpt2":
        raise UsageError(f"--compare-hf compares against HF GPT2LMHeadModel and needs model.family=gpt2, got "
                         f"{base.model.family!r}")
    devices = pick_devices(bench.devices)
    sweep = variants(bench)
    # Every (variant, T) config is built and validated before anything is compiled or timed: bad input fails fast.
    plan = [(label, config_at(base, seq_len=t, batch=batch_for(bench, base, t, len(devices)), model=changes))
            for label, changes in sweep for t in bench.seq_lens]
    budget = memory_budget(bench.max_temp_gb)
    dtype = base.model.dtype
    progress(f"machine: measuring {dtype} matmul rate ...")
    matmul = matmul_rate(bench.matmul_size, dtype, repeats=max(bench.repeats, 10), warmup=1)
    peak = device_peak(dtype, matmul)
    # The step runs on every device of the mesh, so MFU divides by all of their peaks. CPU devices (fake ones
    # included) share the host's cores, and the matmul measured on one of them already used all of those cores:
    # the host counts once.
    scale = 1 if jax.default_backend() == "cpu" else len(devices)
    peak = {**peak, "devices": scale, "total_tflop_per_s": None if peak["tflop_per_s"] is None
            else sig(peak["tflop_per_s"] * scale, 4)}
    progress(f"matmul {matmul['n']}x{matmul['n']} {matmul['dtype']}: {matmul['gflop_per_s']:.1f} GFLOP/s; "
             f"peak for MFU: {peak['tflop_per_s']} TFLOP/s ({peak['source']})")
    result: dict[str, Any] = {
        "bench": "train",
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "machine": machine_info(),
        "config": {**dataclasses.asdict(bench), "devices_used": len(devices)},
        "model_config": dataclasses.asdict(base.model),
        "train_config": dataclasses.asdict(base.train),
        "parallel_config": dataclasses.asdict(base.parallel),
        "flop_convention": TRAIN_FLOP_CONVENTION,
        "memory_convention": MEMORY_CONVENTION,
        "timing": (f"median of {bench.repeats} train steps after {bench.warmup} warm-up step(s), each waited on "
                   f"with jax.block_until_ready; synthetic batch (random tokens, one segment per row)"),
        "batch_policy": ("fixed batch" if bench.batch is not None else
                         f"constant tokens per step = {bench.tokens_per_step or 'max(T) x data-parallel x accum'}"),
        "matmul": matmul,
        "peak": peak,
        "memory_budget": {"bytes": budget["bytes"], "gib": None if budget["bytes"] is None
                          else float(f"{budget['bytes'] / GIB:.4g}"), "source": budget["source"],
                          "applies_to": "compiled total memory per device (arguments + outputs - aliased + temp)"},
        "hf_baseline": None if not bench.compare_hf else (
            "Hugging Face transformers GPT2LMHeadModel, PyTorch CPU, attn_implementation=sdpa, dropout 0, "
            "torch.optim.AdamW + clip_grad_norm_(1.0), random init from a GPT2Config (no download), same [B, T]"),
        "rows": [],
    }
    total = len(plan) + (len(bench.seq_lens) if bench.compare_hf else 0)
    done = 0
    for label, cfg in plan:
        done += 1
        progress(f"[{done}/{total}] {label} T={cfg.data.seq_len} B={cfg.train.batch_size}: compiling ...")
        row = _measure_jaxctx(label, cfg, bench, devices, budget["bytes"], peak["total_tflop_per_s"])
        result["rows"].append(row)
        progress(f"[{done}/{total}] {progress_line(row)}")
        on_row(result)
    if bench.compare_hf:
        first_label = sweep[0][0]
        for label, cfg in plan:
            if label != first_label:
                continue
            done += 1
            progress(f"[{done}/{total}] {HF} T={cfg.data.seq_len} B={cfg.train.batch_size}: running ...")
            ours = [r for r in result["rows"] if r["impl"] == JAXCTX and r["seq_len"] == cfg.data.seq_len]
            # HF runs PyTorch on the CPU: its MFU means something only against a CPU peak.
            hf_peak = peak["total_tflop_per_s"] if jax.default_backend() == "cpu" else None
            row = _measure_hf(cfg, bench, hf_peak, ours[0]["params_matmul"] if ours else None)
            result["rows"].append(row)
            for r in ours:
                if r["tokens_per_s"] and row["tokens_per_s"]:
                    r["hf_tokens_per_s"] = row["tokens_per_s"]
                    r["speedup_vs_hf"] = sig(r["tokens_per_s"] / row["tokens_per_s"], 4)
            progress(f"[{done}/{total}] {progress_line(row)}")
            on_row(result)
    result["summary"] = summarize(result["rows"])
    result["complete"] = True
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: MFU at the shortest and longest T that ran and their ratio; speed-up over HF per T."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(r["variant"] for r in rows):
        ran = sorted((r for r in rows if r["variant"] == label and r["mfu"] is not None), key=lambda r: r["seq_len"])
        entry: dict[str, Any] = {"tokens_per_s": {r["seq_len"]: r["tokens_per_s"] for r in ran},
                                 "mfu": {r["seq_len"]: r["mfu"] for r in ran}}
        if len(ran) >= 2:
            entry["mfu_longest_over_shortest"] = sig(ran[-1]["mfu"] / ran[0]["mfu"], 4)
        speedups = {r["seq_len"]: r["speedup_vs_hf"] for r in rows
                    if r["variant"] == label and r.get("speedup_vs_hf") is not None}
        if speedups:
            entry["speedup_vs_hf"] = speedups
        out[label] = entry
    return out


def progress_line(row: dict[str, Any]) -> str:
    what = f"{row['variant']:>10} T={row['seq_len']:<6} B={row['batch']:<3}"
    mem = "" if row["total_mib"] is None else f", compiled {row['total_mib'] / 1024:.2f} GiB"
    if row["status"] != "ok":
        return f"{what} {row['status']}{mem}"
    mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
    hf = "" if row["speedup_vs_hf"] is None else f", {row['speedup_vs_hf']:.2f}x HF"
    return f"{what} {row['step_ms']:.0f} ms/step, {row['tokens_per_s']:.1f} tokens/s{mfu}{mem}{hf}"
