"""The attention sweep behind `jaxctx bench attention`: implementations x sequence lengths.

For each (impl, T) the forward and the forward+backward are compiled ahead of time from abstract shapes; their
compiled temp memory decides, before any input is allocated, whether the configuration fits the memory budget.
Configurations that fit are timed (median of repeats after warm-up) and reported as milliseconds, useful
GFLOP/s and TFLOP/s (conventions in `jaxctx.bench.flops`), the fraction of a matmul rate measured in the same run,
the fraction of the device's peak (`machine.device_peak`: a data-sheet peak on GPU/TPU, that matmul on CPU) and,
where the backend reports it, the device's peak memory. `trace_dir` adds a `jax.profiler` trace of a few
forward+backward calls per configuration, taken after timing.
Configurations that do not fit are kept as rows with status "skipped: ..." so a table shows *why* a cell is
empty (e.g. the reference kernel's T x T scores at T=32768) instead of the sweep dying on an OOM.

Context parallelism (`--impls ring,all_gather --sequence N`): the context-parallel kernel
(`jaxctx.ops.ring.ring_attention_in_layout`) on the first N devices, q/k/v sharded along T over a `sequence`
axis and already in the layout (`--layout`), as a model holds them. Memory columns are then per device, and rows
gain the bytes each device sends per call (= per layer per step): `*_sent_bytes` from the shapes
(`ring.ring_traffic`, what the kernel's schedule sends) and `*_hlo_sent_bytes` counted from the compiled
program's collectives (`jaxctx.bench.collectives`), which shows what XLA kept (see docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxctx.bench.collectives import collective_bytes
from jaxctx.bench.flops import ATTENTION_FLOP_CONVENTION, attention_flops
from jaxctx.bench.machine import device_peak, machine_info, matmul_rate, memory_budget, peak_device_memory_bytes
from jaxctx.bench.measure import GIB, MIB, Compiled, compile_ahead, format_bytes, profiler_trace, time_call
from jaxctx.errors import UsageError
from jaxctx.ops.attention import IMPLS, attention, resolve_impl
from jaxctx.ops.ring import LAYOUTS, layout_multiple, ring_attention_in_layout, ring_traffic, to_layout_index

CONTEXT_PARALLEL_IMPLS = ("ring", "all_gather")  # strategies of jaxctx.ops.ring; need --sequence N

DEFAULT_SEQ_LENS = tuple(2 ** p for p in range(10, 16))  # 1024 ... 32768
PHASES = ("fwd", "fwd_bwd")  # field prefixes in every row
SCHEMA_VERSION = 1


# cuDNN's fused attention has only half-precision (and fp8) kernels: with float32 inputs jax raises.
CUDNN_DTYPES = ("bfloat16", "float16")


def available_impls(backend: str | None = None, dtype: str = "float32") -> tuple[str, ...]:
    """The implementations that run on `backend` with `dtype` inputs: the default `--impls`."""
    backend = backend or jax.default_backend()
    impls = ["reference", "xla", "blockwise"]
    if backend == "gpu" and dtype in CUDNN_DTYPES:
        impls.append("cudnn")
    # pallas_gpu needs a GPU and jax's Pallas (Triton) attention; it takes f32 too (cuDNN does not).
    if backend == "gpu" and importlib.util.find_spec("jax.experimental.pallas.ops.gpu.attention") is not None:
        impls.append("pallas_gpu")
    # splash needs both a TPU and our TPU-only wrapper module, which may not exist yet.
    if backend == "tpu" and importlib.util.find_spec("jaxctx.ops.splash") is not None:
        impls.append("splash")
    return tuple(impls)


def check_impls(impls, backend: str | None = None, dtype: str = "float32") -> tuple[str, ...]:
    """Validate implementation names against the kernels, the backend and the dtype; errors name valid ones."""
    backend = backend or jax.default_backend()
    if not impls:
        raise UsageError(f"--impls is empty; choose from {', '.join(IMPLS)}")
    runnable = available_impls(backend, dtype)
    for impl in impls:
        if impl in CONTEXT_PARALLEL_IMPLS:
            continue  # any backend; check_context_parallel checks --sequence
        if impl not in IMPLS:
            raise UsageError(f"--impls: unknown implementation {impl!r}; valid: {', '.join(IMPLS)}, "
                             f"{', '.join(CONTEXT_PARALLEL_IMPLS)} (with --sequence N) "
                             f"(on this {backend} machine: {', '.join(runnable)})")
        if impl == "cudnn" and backend == "gpu" and dtype not in CUDNN_DTYPES:
            raise UsageError(f"--impls: 'cudnn' needs --dtype {' or '.join(CUDNN_DTYPES)} (cuDNN fused attention "
                             f"has no {dtype} kernel); got --dtype {dtype}")
        if impl != "auto" and impl not in runnable:
            need = {"cudnn": "a GPU", "pallas_gpu": "a GPU with jax's Pallas GPU attention",
                    "splash": "a TPU with jaxctx.ops.splash"}.get(impl, "another backend")
            raise UsageError(f"--impls: {impl!r} needs {need}, but the backend is {backend!r}; "
                             f"on this machine use {', '.join(runnable)}")
    return tuple(dict.fromkeys(impls))  # drop repeats, keep order


@dataclasses.dataclass(frozen=True)
class AttentionBenchConfig:
    """One sweep. Shapes follow `jaxctx.ops.attention`: q [B, T, H, D], k/v [B, T, Hkv, D]."""

    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS  # T values, tokens
    impls: tuple[str, ...] | None = None  # None = every implementation that runs on this backend
    causal: bool = True  # causal masking (FLOPs counted as half)
    dtype: str = "float32"  # q/k/v dtype; the matmul reference uses the same
    batch: int = 1  # B
    heads: int = 8  # H, query heads
    kv_heads: int | None = None  # Hkv (None = H, i.e. no grouped-query attention)
    head_dim: int = 64  # D
    block_q: int | None = None  # blockwise query block (None = kernel default)
    block_k: int | None = None  # blockwise key block (None = kernel default)
    repeats: int = 3  # timed calls per measurement; the median is reported
    warmup: int = 1  # untimed calls before timing
    max_temp_gb: float | None = None  # temp-memory budget in GiB (None = machine default, see memory_budget)
    matmul_size: int | None = None  # n of the n x n matmul reference (None = machine default)
    trace_dir: str | None = None  # jax.profiler trace of `trace_steps` fwd+bwd calls per configuration, or None
    trace_steps: int = 3  # calls traced (after timing, so tracing never slows a reported number)
    sequence: int | None = None  # N: devices one sequence is split over (ring / all_gather impls only)
    layout: str = "zigzag"  # token layout over those devices (ring / all_gather impls only)

    def validated(self) -> "AttentionBenchConfig":
        """Check every field; return a copy with defaults filled in (impls, kv_heads) and seq_lens sorted."""
        seq_lens = check_seq_lens(self.seq_lens)
        impls = check_impls(self.impls if self.impls is not None else available_impls(dtype=self.dtype),
                            dtype=self.dtype)
        kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        positive = {"batch": self.batch, "heads": self.heads, "kv_heads": kv_heads, "head_dim": self.head_dim,
                    "repeats": self.repeats}
        if self.trace_dir is not None:
            positive["trace_steps"] = self.trace_steps
        for flag in ("block_q", "block_k", "matmul_size"):
            if getattr(self, flag) is not None:
                positive[flag] = getattr(self, flag)
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"--warmup must be a non-negative integer, got {self.warmup!r}")
        if self.heads % kv_heads:
            raise UsageError(f"--heads {self.heads} must be divisible by --kv-heads {kv_heads} (grouped-query "
                             f"attention shares each k/v head across heads / kv_heads query heads)")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise UsageError(f"--dtype {self.dtype!r} is not a dtype; use float32, bfloat16 or float16") from None
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise UsageError(f"--dtype must be floating (float32, bfloat16, float16), got {self.dtype!r}")
        if self.max_temp_gb is not None and not self.max_temp_gb > 0:
            raise UsageError(f"--max-temp-gb must be a positive number of GiB, got {self.max_temp_gb!r}")
        check_context_parallel(impls, self.sequence, self.layout, seq_lens)
        return dataclasses.replace(self, seq_lens=seq_lens, impls=impls, kv_heads=kv_heads)


def check_context_parallel(impls, sequence: int | None, layout: str, seq_lens, device_count: int | None = None):
    """--sequence N goes with the context-parallel impls and only with them; N devices must exist; every T must
    split into the layout's chunks (2N for zigzag, N for contiguous)."""
    cp = [i for i in impls if i in CONTEXT_PARALLEL_IMPLS]
    if sequence is None:
        if cp:
            raise UsageError(f"--impls {cp[0]} splits each sequence over devices: give --sequence N (e.g. "
                             f"--sequence 4)")
        return
    other = [i for i in impls if i not in CONTEXT_PARALLEL_IMPLS]
    if other:
        raise UsageError(f"--sequence applies to the context-parallel impls ({', '.join(CONTEXT_PARALLEL_IMPLS)}) "
                         f"only, got --impls {','.join(other)}; sweep single-device kernels without --sequence")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence <= 0:
        raise UsageError(f"--sequence must be a positive integer, got {sequence!r}")
    count = jax.device_count() if device_count is None else device_count
    if sequence > count:
        raise UsageError(f"--sequence {sequence} needs {sequence} devices, this process has {count} (on CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={sequence} makes fake ones)")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    m = layout_multiple(sequence, layout)
    for t in seq_lens:
        if t % m:
            raise UsageError(f"--seq-lens: {t} is not divisible by {m} (the {layout} layout splits T into "
                             f"{'2 x ' if layout == 'zigzag' else ''}--sequence {sequence} equal chunks)")


def check_seq_lens(seq_lens) -> tuple[int, ...]:
    """Sequence lengths must be positive integers; returns them sorted without repeats (plots need order)."""
    if not seq_lens:
        raise UsageError("--seq-lens is empty; give positive integers, e.g. 1024,2048,4096")
    for t in seq_lens:
        if not isinstance(t, int) or isinstance(t, bool) or t <= 0:
            raise UsageError(f"--seq-lens: {t!r} is not a positive integer; give e.g. 1024,2048,4096")
    return tuple(sorted(set(seq_lens)))


# ----------------------------------------------------------------------------------------------------------
# The functions being measured
# ----------------------------------------------------------------------------------------------------------

def _mesh(cfg: AttentionBenchConfig):
    """The `sequence` mesh over the first N devices (None for single-device impls)."""
    if cfg.sequence is None:
        return None
    return jax.make_mesh((cfg.sequence,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:cfg.sequence])


def _attention_fns(cfg: AttentionBenchConfig, impl: str) -> dict[str, Callable]:
    """Forward and forward+backward of one implementation, as plain functions of arrays (jit happens later).

    Context-parallel impls run on the layout-ordered, T-sharded arrays, with the original positions (a
    constant of the program, as in the model) telling the kernel what each token may see."""
    if impl in CONTEXT_PARALLEL_IMPLS:
        mesh = _mesh(cfg)

        def fwd(q, k, v):
            positions = jnp.asarray(to_layout_index(q.shape[1], cfg.sequence, cfg.layout))  # [T]
            return ring_attention_in_layout(q, k, v, positions, mesh=mesh, causal=cfg.causal, strategy=impl,
                                            block_q=cfg.block_q, block_k=cfg.block_k)
    else:
        def fwd(q, k, v):
            return attention(q, k, v, causal=cfg.causal, impl=impl, block_q=cfg.block_q, block_k=cfg.block_k)

    def fwd_bwd(q, k, v, d_out):
        # vjp with a given output cotangent is exactly one forward plus one backward: no loss reduction that a
        # kernel could fold away, and the same work a training step asks of attention.
        out, pullback = jax.vjp(fwd, q, k, v)
        return out, pullback(d_out)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def _sharding(cfg: AttentionBenchConfig):
    """[B, T, ...] arrays split along T over the `sequence` axis (None: one device)."""
    mesh = _mesh(cfg)
    return None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))


def _abstract_inputs(cfg: AttentionBenchConfig, t: int) -> dict[str, tuple]:
    dtype, sharding = jnp.dtype(cfg.dtype), _sharding(cfg)
    q = jax.ShapeDtypeStruct((cfg.batch, t, cfg.heads, cfg.head_dim), dtype, sharding=sharding)  # [B, T, H, D]
    kv = jax.ShapeDtypeStruct((cfg.batch, t, cfg.kv_heads, cfg.head_dim), dtype, sharding=sharding)  # [B,T,Hkv,D]
    return {"fwd": (q, kv, kv), "fwd_bwd": (q, kv, kv, q)}  # d_out has q's shape


def _concrete_inputs(cfg: AttentionBenchConfig, t: int) -> dict[str, tuple]:
    """Random inputs, made on the device (no host->device copy of T-sized arrays), shared by all impls."""
    abstract = _abstract_inputs(cfg, t)["fwd_bwd"]
    keys = jax.random.split(jax.random.PRNGKey(t), len(abstract))
    # Made by a jit with the inputs' shardings: each device draws only its own T/N tokens.
    q, k, v, d_out = (jax.jit(functools.partial(jax.random.normal, shape=a.shape, dtype=a.dtype),
                              out_shardings=a.sharding)(key) for key, a in zip(keys, abstract))
    return {"fwd": (q, k, v), "fwd_bwd": (q, k, v, d_out)}


# ----------------------------------------------------------------------------------------------------------
# One row = one (impl, T)
# ----------------------------------------------------------------------------------------------------------

def _traffic(cfg: AttentionBenchConfig, impl: str, t: int) -> dict[str, int]:
    """Bytes one device sends per call, by phase, as the kernel's schedule has it (`ring.ring_traffic`)."""
    by_op = ring_traffic(cfg.batch, t, cfg.kv_heads, cfg.head_dim, cfg.sequence, strategy=impl, dtype=cfg.dtype,
                         block_q=cfg.block_q, block_k=cfg.block_k)
    fwd, bwd = sum(by_op["fwd"].values()), sum(by_op["bwd"].values())
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else _sig(nbytes / MIB)


def _sig(x: float, digits: int = 5) -> float:
    # Significant digits, not decimals: tiny test sizes and huge sweeps both keep their precision in the JSON.
    return float(f"{x:.{digits}g}")


def _short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _measure_row(cfg: AttentionBenchConfig, impl: str, t: int, budget: int | None, matmul_gflops: float,
                 inputs: Callable[[], dict[str, tuple]], peak_tflops: float | None = None) -> dict[str, Any]:
    flops = attention_flops(cfg.batch, cfg.heads, t, cfg.head_dim, causal=cfg.causal)
    cp = impl in CONTEXT_PARALLEL_IMPLS
    row: dict[str, Any] = {
        "impl": impl, "kernel": impl if cp else resolve_impl(impl), "seq_len": t, "batch": cfg.batch,
        "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
        "causal": cfg.causal, "block_q": cfg.block_q, "block_k": cfg.block_k,
        "sequence": cfg.sequence if cp else 1, "layout": cfg.layout if cp else None,
        "status": "ok", "peak_device_mib": None, "trace": None,
    }
    traffic = _traffic(cfg, impl, t) if cp else None
    fns, abstract = _attention_fns(cfg, impl), _abstract_inputs(cfg, t)
    for phase in PHASES:
        row.update({f"{phase}_status": "ok", f"{phase}_gflop": flops[phase] / 1e9, f"{phase}_ms": None,
                    f"{phase}_min_ms": None, f"{phase}_gflop_per_s": None, f"{phase}_matmul_fraction": None,
                    f"{phase}_tflop_per_s": None, f"{phase}_peak_fraction": None,
                    f"{phase}_temp_bytes": None, f"{phase}_temp_mib": None, f"{phase}_argument_mib": None,
                    f"{phase}_output_mib": None, f"{phase}_total_mib": None, f"{phase}_compile_s": None,
                    f"{phase}_sent_bytes": None if traffic is None else traffic[phase],
                    f"{phase}_sent_mib": None if traffic is None else _mib(traffic[phase]),
                    f"{phase}_hlo_sent_bytes": None})
        try:
            compiled: Compiled = compile_ahead(fns[phase], *abstract[phase])
        except Exception as err:  # an XLA/cuDNN refusal is a result to record, not a reason to lose the sweep
            row[f"{phase}_status"] = f"error: compile failed: {_short_error(err)}"
            continue
        mem = compiled.memory  # per device: the program is the SPMD-partitioned one each device runs
        row.update({f"{phase}_temp_bytes": mem.temp_bytes, f"{phase}_temp_mib": _mib(mem.temp_bytes),
                    f"{phase}_argument_mib": _mib(mem.argument_bytes), f"{phase}_output_mib": _mib(mem.output_bytes),
                    f"{phase}_total_mib": _mib(mem.total_bytes), f"{phase}_compile_s": round(compiled.compile_s, 3)})
        if cp:
            row[f"{phase}_hlo_sent_bytes"] = sum(collective_bytes(compiled.executable.as_text()).values())
        if budget is not None and mem.temp_bytes is not None and mem.temp_bytes > budget:
            row[f"{phase}_status"] = (f"skipped: needs {format_bytes(mem.temp_bytes)} temp > budget "
                                      f"{format_bytes(budget)}")
            continue
        try:
            args = inputs()[phase]
            timing = time_call(lambda: compiled.executable(*args), repeats=cfg.repeats, warmup=cfg.warmup)
        except Exception as err:  # e.g. a runtime OOM the analysis did not predict
            row[f"{phase}_status"] = f"error: run failed: {_short_error(err)}"
            continue
        rate = flops[phase] / timing.median_s / 1e9
        row.update({f"{phase}_ms": _sig(timing.median_s * 1e3), f"{phase}_min_ms": _sig(timing.min_s * 1e3),
                    f"{phase}_gflop_per_s": _sig(rate), f"{phase}_tflop_per_s": _sig(rate / 1e3),
                    f"{phase}_matmul_fraction": _sig(rate / matmul_gflops) if matmul_gflops else None,
                    f"{phase}_peak_fraction": _sig(rate / 1e3 / peak_tflops) if peak_tflops else None})
        if phase == "fwd_bwd" and cfg.trace_dir is not None:
            trace_dir = os.path.join(cfg.trace_dir, f"{impl}-T{t}")
            with profiler_trace(trace_dir):
                for _ in range(cfg.trace_steps):
                    jax.block_until_ready(compiled.executable(*args))
            row["trace"] = trace_dir
    peak = peak_device_memory_bytes()
    row["peak_device_mib"] = _mib(peak)
    # Overall status: the first non-ok phase explains the row (fwd+bwd named so "skipped" says which).
    for phase in PHASES:
        status = row[f"{phase}_status"]
        if status != "ok":
            kind, _, reason = status.partition(": ")
            row["status"] = f"{kind}: {phase.replace('_', '+')} {reason}"
            break
    return row


def run_attention_bench(cfg: AttentionBenchConfig, *, progress: Callable[[str], None] = lambda line: None,
                        on_row: Callable[[dict], None] = lambda result: None) -> dict[str, Any]:
    """Run the sweep; return the JSON-ready result {"bench", "machine", "config", ..., "rows"}.

    `progress` gets one human-readable line per configuration; `on_row` gets the partial result after each
    row so a caller can save it (a long sweep interrupted at T=32768 keeps everything before it).
    """
    cfg = cfg.validated()
    budget = memory_budget(cfg.max_temp_gb)
    progress(f"machine: measuring {cfg.dtype} matmul rate ...")
    matmul = matmul_rate(cfg.matmul_size, cfg.dtype, repeats=max(cfg.repeats, 3), warmup=max(cfg.warmup, 1))
    peak = device_peak(cfg.dtype, matmul)
    budget_text = "none" if budget["bytes"] is None else format_bytes(budget["bytes"])
    progress(f"matmul {matmul['n']}x{matmul['n']} {matmul['dtype']}: {matmul['gflop_per_s']:.1f} GFLOP/s; "
             f"temp budget {budget_text} ({budget['source']})")
    result: dict[str, Any] = {
        "bench": "attention",
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "machine": machine_info(),
        "config": dataclasses.asdict(cfg),
        "flop_convention": ATTENTION_FLOP_CONVENTION,
        "timing": f"median of {cfg.repeats} calls after {cfg.warmup} warm-up call(s), jax.block_until_ready",
        "matmul": matmul,
        "peak": peak,
        "peak_device_memory": "peak_device_mib: memory_stats()['peak_bytes_in_use'] of device 0 after the row, "
                              "process-wide and monotone (rows run in increasing T); null where the backend "
                              "reports none (CPU)",
        "communication": "sent_bytes: bytes each device sends per call (one layer, one step) over the "
                         "interconnect as the ring kernel's schedule has it (jaxctx.ops.ring.ring_traffic); "
                         "hlo_sent_bytes: the same counted from the compiled program's collectives; "
                         "fwd_bwd = forward + backward; null for single-device kernels",
        "memory_budget": {"bytes": budget["bytes"], "gib": None if budget["bytes"] is None
                          else float(f"{budget['bytes'] / GIB:.4g}"), "source": budget["source"],
                          "applies_to": "compiled temp memory (temp_size_in_bytes) of each fwd / fwd+bwd"},
        "rows": [],
    }
    total, done = len(cfg.seq_lens) * len(cfg.impls), 0
    for t in cfg.seq_lens:
        cache: dict[str, dict] = {}

        def inputs() -> dict[str, tuple]:
            # Allocated lazily, once per T: a T where everything is skipped never allocates its inputs.
            if "x" not in cache:
                cache["x"] = _concrete_inputs(cfg, t)
            return cache["x"]

        for impl in cfg.impls:
            done += 1
            row = _measure_row(cfg, impl, t, budget["bytes"], matmul["gflop_per_s"], inputs, peak["tflop_per_s"])
            result["rows"].append(row)
            progress(f"[{done}/{total}] {progress_line(row)}")
            on_row(result)
        cache.clear()  # free this T's inputs before the next, larger T
    result["complete"] = True
    return result


def progress_line(row: dict[str, Any]) -> str:
    """One line per configuration: what ran, how fast, how much memory, or why not."""

    def part(phase: str, label: str) -> str:
        status, ms, mib = row[f"{phase}_status"], row[f"{phase}_ms"], row[f"{phase}_temp_mib"]
        mem = "" if mib is None else f", temp {mib:.1f} MiB"
        if status == "ok":
            return f"{label} {ms:.2f} ms ({row[f'{phase}_gflop_per_s']:.1f} GFLOP/s{mem})"
        return f"{label} {status}"

    return f"{row['impl']:>9} T={row['seq_len']:<6} {part('fwd', 'fwd')} | {part('fwd_bwd', 'fwd+bwd')}"
