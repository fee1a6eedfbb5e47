"""The real train step of a config at a chosen length, as benches need it: compiled ahead of time, fed synthetic data.

Shared by `jaxctx bench train` (times it), `jaxctx bench max-context` (only compiles it) and `jaxctx plan` (breaks
its memory down). Nothing here re-implements training: the step is `jaxctx.train.runner.JitRunner`'s (jit with
in/out shardings from the logical-axis rules, state donated), lowered for abstract inputs with `JitRunner.lower`,
so `Compiled.memory_analysis()` describes exactly the program `train.py` runs.

Batches are synthetic (no data pipeline): uniformly random tokens, one segment per row (segment id 1), positions
0..T-1 and every token scored, in the packed format of `jaxctx.data.packing`. The step's cost does not depend on
token values, so random tokens time it exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxctx.bench.flops import matmul_param_count
from jaxctx.bench.measure import CompiledMemory, memory_of
from jaxctx.config import Config, ConfigError
from jaxctx.parallel import make_mesh
from jaxctx.errors import UsageError

# Families whose learned position table must hold T rows (llama's RoPE has no table).
LEARNED_POSITIONS = ("gpt2", "bert")
# Model fields that may not exceed data.seq_len.
CLAMPED_TO_SEQ_LEN = ("attention_block_q", "attention_block_k", "mlp_chunk", "loss_chunk")


def config_at(cfg: Config, *, seq_len: int, batch: int, model: dict[str, Any] | None = None) -> Config:
    """`cfg` at sequence length `seq_len` with global batch `batch` (sequences), validated.

    Sets data.seq_len and train.batch_size; for learned positions (gpt2, bert) also model.max_positions = seq_len,
    the table a model trained at that length has. `model` overrides further ModelConfig fields (bench variants).
    Attention blocks and MLP/loss chunks longer than a device's share of seq_len (all of it unless
    parallel.sequence > 1) are clamped to it (the kernels would do the same).
    The jit path is always measured (parallel.mode=jit): pmap runs the same per-device program.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise UsageError(f"sequence length must be a positive integer, got {seq_len!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise UsageError(f"batch size must be a positive integer, got {batch!r}")
    model_changes = dict(model or {})
    if cfg.model.family in LEARNED_POSITIONS:
        model_changes["max_positions"] = seq_len
    unknown = set(model_changes) - {f.name for f in dataclasses.fields(cfg.model)}
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}")
    model_cfg = dataclasses.replace(cfg.model, **model_changes)
    # A block or chunk longer than T acts as T (the kernels clamp it), but the config rejects it: clamp here so
    # one setting serves a whole sweep of lengths.
    local = seq_len // cfg.parallel.sequence  # tokens per device along the sequence axis
    model_cfg = dataclasses.replace(model_cfg, **{k: local for k in CLAMPED_TO_SEQ_LEN
                                                  if (getattr(model_cfg, k) or 0) > local})
    new = dataclasses.replace(
        cfg,
        model=model_cfg,
        data=dataclasses.replace(cfg.data, seq_len=seq_len),
        train=dataclasses.replace(cfg.train, batch_size=batch),
        parallel=dataclasses.replace(cfg.parallel, mode="jit"),
    )
    return new.resolved()


def pick_devices(count: int | None) -> list:
    """The first `count` devices (default: all). Benches on a CPU host with fake devices use this to stay small."""
    devices = jax.devices()
    if count is None:
        return devices
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(devices):
        raise UsageError(f"--devices must be between 1 and the {len(devices)} available devices, got {count!r}")
    return devices[:count]


def batch_keys(cfg: Config) -> tuple[str, ...]:
    from jaxctx.train.step import TASK_FIELDS  # the train step's imports stay out of `jaxctx --help`

    keys = ("input_ids", *TASK_FIELDS[cfg.model.task], "segment_ids", "positions")
    return keys + (("token_type_ids",) if cfg.model.family == "bert" else ())


def _examples(cfg: Config) -> int:
    """Example slots per row of a synthetic sequence-task batch: parallel.sequence (the batch sharding splits a
    [B, E] array's second axis over the `sequence` mesh axis, so E must divide evenly), at least 1."""
    return max(1, cfg.parallel.sequence)


def _batch_shapes(cfg: Config) -> dict[str, tuple[tuple[int, ...], type]]:
    """{key: (global shape, dtype)} of one batch of cfg's task (jaxctx.train.step.TASK_FIELDS)."""
    b, t = cfg.train.batch_size, cfg.data.seq_len
    shapes = {k: ((b, t), jnp.int32) for k in batch_keys(cfg)}
    if "loss_mask" in shapes:
        shapes["loss_mask"] = ((b, t), jnp.float32)
    if cfg.model.task == "sequence_classification":
        e, problem = _examples(cfg), cfg.model.problem
        shapes.update(cls_index=((b, e), jnp.int32), label_mask=((b, e), jnp.float32),
                      labels=((b, e), jnp.int32) if problem == "single_label" else
                      ((b, e, cfg.model.num_labels), jnp.float32) if problem == "multi_label" else
                      ((b, e), jnp.float32))
    return shapes


def abstract_batch(cfg: Config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch with the batch sharding (ids int32, masks float32; task fields as
    jaxctx.train.step.TASK_FIELDS)."""
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in _batch_shapes(cfg).items()}


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """One host batch of random tokens in the packed format; one segment (id 1) per row, all tokens scored.

    Causal LMs: input_ids/targets are a random stream shifted by one. BERT: 15% of positions are scored MLM
    targets (the cost is the same whichever are chosen; the loss is computed at every position). Task models:
    random labels; a sequence task's example slots all read the row's first (bert) or last token.
    """
    b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, v, size=(b, t + 1), dtype=np.int32)
    batch = {
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }
    if cfg.model.family == "bert":
        batch["token_type_ids"] = np.zeros((b, t), np.int32)
    if cfg.model.task != "lm":
        batch["input_ids"] = tokens[:, :t].copy()
        n, shapes = cfg.model.num_labels, _batch_shapes(cfg)
        if cfg.model.task == "token_classification":
            batch.update(labels=rng.integers(0, n, (b, t), dtype=np.int32), loss_mask=np.ones((b, t), np.float32))
        else:
            index = 0 if cfg.model.family == "bert" else t - 1
            labels = rng.integers(0, n, shapes["labels"][0]) if cfg.model.problem != "regression" else \
                rng.normal(size=shapes["labels"][0])
            batch.update(cls_index=np.full(shapes["cls_index"][0], index, np.int32),
                         label_mask=np.ones(shapes["label_mask"][0], np.float32),
                         labels=labels.astype(shapes["labels"][1]))
    elif cfg.model.family == "bert":
        batch.update(input_ids=tokens[:, :t].copy(), targets=tokens[:, :t].copy(),
                     loss_mask=(rng.random((b, t)) < cfg.data.mlm_probability).astype(np.float32))
    else:
        batch.update(input_ids=tokens[:, :t].copy(), targets=tokens[:, 1:].copy(),
                     loss_mask=np.ones((b, t), np.float32))
    return batch


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry shardings (replicated leaves count whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class StepProgram:
    """One compiled train step: what it is, what it needs, and the handles to run it."""

    cfg: Config
    runner: Any  # jaxctx.train.runner.JitRunner
    compiled: Any  # jax.stages.Compiled: compiled(state, batch) -> (state, metrics); the state is donated
    memory: CompiledMemory  # per device
    compile_s: float
    params: dict[str, int]  # jaxctx.bench.flops.matmul_param_count(...)
    state_bytes: dict[str, int]  # per device: params, opt_state, step
    batch_bytes: int  # per device
    devices: int
    dump_dir: str | None = None  # XLA dump (buffer assignment, memory-usage report) when asked for

    @property
    def total_bytes(self) -> int | None:
        return self.memory.total_bytes

    def init_state(self, seed: int = 0):
        return self.runner.init(seed)

    def device_batch(self, seed: int = 0) -> dict:
        return self.runner.put_batch(synthetic_batch(self.cfg, seed))


def compile_step(cfg: Config, *, devices: list | None = None, dump_dir: str | None = None) -> StepProgram:
    """Build the runner for `cfg` on `devices` and compile its step for abstract inputs (nothing is allocated).

    `dump_dir` asks XLA to write its buffer assignment and memory-usage report there (`buffer_report` reads it).
    """
    devices = list(jax.devices() if devices is None else devices)
    runner = build_runner(cfg, devices)
    inputs = abstract_batch(cfg, runner.batch_sharding)
    start = time.perf_counter()
    lowered = runner.lower(inputs)
    options = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True} if dump_dir else None
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    compile_s = time.perf_counter() - start
    params = matmul_param_count(runner.abstract_params(), vocab_size=cfg.model.vocab_size,
                                d_model=cfg.model.d_model, tied=cfg.model.tied)
    return StepProgram(cfg=cfg, runner=runner, compiled=compiled, memory=memory_of(compiled), compile_s=compile_s,
                       params=params, state_bytes=state_bytes(runner), batch_bytes=_per_device_bytes(inputs),
                       devices=len(devices), dump_dir=dump_dir)


def build_runner(cfg: Config, devices: list):
    """The JitRunner of `cfg` on a mesh over `devices` (abstract state only: nothing compiled or allocated)."""
    from jaxctx.train.runner import make_runner  # imports the models; kept out of `jaxctx --help`

    return make_runner(cfg, make_mesh(cfg.parallel, devices))  # checks the batch splits over data-parallel devices


def state_bytes(runner) -> dict[str, int]:
    """Per-device bytes of the train state's parts: {"params", "opt_state", "step"}."""
    abstract = runner._abstract  # noqa: SLF001 - the runner's own abstract state, shardings attached
    return {"params": _per_device_bytes(abstract.params), "opt_state": _per_device_bytes(abstract.opt_state),
            "step": _per_device_bytes(abstract.step)}


# ----------------------------------------------------------------------------------------------------------
# What the temp memory is made of: XLA's memory-usage report
# ----------------------------------------------------------------------------------------------------------

_REPORT_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*(\d+);\s*(\d+);\s*(.*)$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "TiB": 1024 ** 4}


def parse_memory_usage_report(text: str, top: int = 10) -> list[dict[str, Any]]:
    """The largest slots of the main memory space in XLA's `*memory-usage-report.txt`.

    A slot is one offset range of the temp allocation; XLA reuses it for values whose lifetimes do not overlap, so
    each slot lists every shape that lived there. The slots' sizes add up to the temp bytes, so the top slots say
    which buffers the peak is made of. Returns [{"bytes", "values", "shapes"}], largest first.
    """
    rows = []
    for line in text.splitlines():
        if rows and not line.strip():
            break  # the first table (main memory space) ends at the first blank line after its rows
        m = _REPORT_ROW.match(line)
        if m:
            size, unit, _offset, n_values, shapes = m.groups()
            rows.append({"bytes": int(float(size) * _UNITS.get(unit, 1)), "values": int(n_values),
                         "shapes": shapes.strip()})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def buffer_report(program: StepProgram, top: int = 10) -> list[dict[str, Any]]:
    """Top temp slots of a program compiled with `dump_dir` (empty if the backend wrote no report)."""
    if not program.dump_dir:
        raise ValueError("buffer_report needs a program compiled with compile_step(..., dump_dir=DIR)")
    reports = sorted(p for p in os.listdir(program.dump_dir)
                     if "train_step" in p and p.endswith("memory-usage-report.txt"))
    if not reports:
        return []
    with open(os.path.join(program.dump_dir, reports[-1]), encoding="utf-8") as f:
        return parse_memory_usage_report(f.read(), top)


def compile_with_report(cfg: Config, *, devices: list | None = None, top: int = 10):
    """compile_step plus its top temp slots, the XLA dump in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="jaxctx-xla-dump-") as tmp:
        program = compile_step(cfg, devices=devices, dump_dir=tmp)
        slots = buffer_report(program, top)
        program.dump_dir = None
    return program, slots
