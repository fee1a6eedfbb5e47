"""`jaxctx plan`: the memory of one config's train step, per device, before launching it.

The step is compiled ahead of time exactly as `train.py` would run it (`jaxctx.bench.trainstep.compile_step`:
the config's own sequence length, batch, mesh and parallel layout; the jit path) and nothing is allocated. The
breakdown comes from the abstract state (params, optimizer state: their per-device shard sizes) and from
`Compiled.memory_analysis()` (arguments, outputs, aliasing from donation, temp). `temp` is everything XLA allocates
while the step runs: activations saved for the backward pass, gradients, optimizer temporaries.

With `parallel.sequence > 1` the plan also says what the interconnect must carry: the bytes each device sends
per layer per step for attention, forward and backward, for both context-parallel strategies
(`jaxctx.ops.ring.ring_traffic`, from the shapes), next to what the compiled step actually sends: the ring
kernel's collectives and all of the step's (gradient all-reduces included), counted in its HLO
(`jaxctx.bench.collectives`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxctx import config as config_lib
from jaxctx.bench.collectives import collective_bytes
from jaxctx.bench.machine import _device_memory_bytes, host_memory_bytes, machine_info
from jaxctx.bench.measure import format_bytes, mib
from jaxctx.bench.trainstep import compile_step, compile_with_report, pick_devices
from jaxctx.errors import UsageError
from jaxctx.ops.ring import STRATEGIES, ring_traffic
from jaxctx.platform import check_platform

SCHEMA_VERSION = 1


def device_capacity(backend: str | None = None) -> dict[str, Any]:
    """Memory one device may use: its own memory on GPU/TPU; on CPU the host RAM shared by the local devices."""
    backend = backend or jax.default_backend()
    device = jax.local_devices()[0]
    if backend != "cpu":
        limit = _device_memory_bytes(device)
        if limit is not None:
            return {"bytes": limit, "source": f"{device.device_kind} memory (memory_stats bytes_limit)"}
    host = host_memory_bytes()
    if host is None:
        return {"bytes": None, "source": "unknown"}
    n = jax.local_device_count()
    share = f" / {n} local devices" if n > 1 else ""
    return {"bytes": host // n, "source": f"host RAM{share}"}


def run_plan(config: str | None, overrides=(), *, devices: int | None = None, buffers: int = 0) -> dict[str, Any]:
    """Compile `config`'s step and return its per-device memory breakdown (JSON-ready)."""
    if not isinstance(buffers, int) or buffers < 0:
        raise UsageError(f"--buffers must be a non-negative integer, got {buffers!r}")
    cfg = config_lib.load(config, list(overrides))
    check_platform(cfg)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="jit"))
    devs = pick_devices(devices)
    if buffers:
        program, slots = compile_with_report(cfg, devices=devs, top=buffers)
    else:
        program, slots = compile_step(cfg, devices=devs), []
    mem = program.memory
    state = program.state_bytes
    capacity = device_capacity()
    total = mem.total_bytes
    not_aliased = None if mem.output_bytes is None else mem.output_bytes - (mem.alias_bytes or 0)
    rows = [
        {"component": "params", "bytes": state["params"], "note": "float32, this device's shards"},
        {"component": "optimizer state", "bytes": state["opt_state"] + state["step"],
         "note": f"{cfg.train.optimizer} moments (+ step counter)"},
        {"component": "batch", "bytes": program.batch_bytes,
         "note": f"this device's rows of the [{cfg.train.batch_size}, {cfg.data.seq_len}] input arrays"},
        {"component": "temp (activations, gradients, optimizer temporaries)", "bytes": mem.temp_bytes,
         "note": f"remat_policy={cfg.model.remat_policy}, attention={cfg.model.attention}, "
                 f"mlp_chunk={cfg.model.mlp_chunk}, loss_chunk={cfg.model.loss_chunk}"},
        {"component": "outputs not aliased to inputs", "bytes": not_aliased,
         "note": "new state is written over the donated old state; this is the rest (metrics)"},
        {"component": "total per device", "bytes": total, "note": "arguments + outputs - aliased + temp"},
    ]
    for row in rows:
        row["mib"] = mib(row["bytes"])
    fits = None if total is None or capacity["bytes"] is None else total <= capacity["bytes"]
    return {
        "bench": "plan",
        "schema_version": SCHEMA_VERSION,
        "machine": machine_info(),
        "config_path": config,
        "overrides": list(overrides),
        "model_config": dataclasses.asdict(cfg.model),
        "seq_len": cfg.data.seq_len,
        "batch": cfg.train.batch_size,
        "devices_used": program.devices,
        "mesh": dict(program.runner.mesh.shape),
        "params": program.params,
        "compiled": {"temp_bytes": mem.temp_bytes, "argument_bytes": mem.argument_bytes,
                     "output_bytes": mem.output_bytes, "alias_bytes": mem.alias_bytes, "total_bytes": total},
        "compile_s": round(program.compile_s, 2),
        "capacity": capacity,
        "fits": fits,
        "fraction_of_capacity": None if fits is None else round(total / capacity["bytes"], 4),
        "rows": rows,
        "top_temp_buffers": [{"mib": mib(s["bytes"]), "values": s["values"], "shapes": s["shapes"]} for s in slots],
        "communication": communication(cfg, program),
    }


def communication(cfg, program) -> dict[str, Any] | None:
    """Bytes each device sends per step under context parallelism (None when parallel.sequence is 1).

    per_layer[strategy]: the kernel's schedule for one layer (forward, backward) from the shapes each device
    holds: its rows of the batch (batch / (data x fsdp)), T / sequence tokens, all Hkv heads (k/v are not split
    over `tensor`), the compute dtype, segment ids (the step always passes them). compiled: the configured
    strategy as XLA compiled the step; it exceeds layers x (forward + backward) when the remat policy recomputes
    each layer's forward (ring hops included) in the backward pass."""
    n = cfg.parallel.sequence
    if n <= 1:
        return None
    mesh = dict(program.runner.mesh.shape)
    rows = cfg.train.batch_size // (mesh.get("data", 1) * mesh.get("fsdp", 1))
    m, layers = cfg.model, cfg.model.num_layers
    per_layer = {}
    for strategy in STRATEGIES:
        t = ring_traffic(rows, cfg.data.seq_len, m.kv_heads, m.dim_per_head, n, strategy=strategy, dtype=m.dtype,
                         segment_ids=True, block_q=m.attention_block_q, block_k=m.attention_block_k)
        fwd, bwd = sum(t["fwd"].values()), sum(t["bwd"].values())
        per_layer[strategy] = {"fwd_bytes": fwd, "bwd_bytes": bwd, "fwd_bwd_bytes": fwd + bwd,
                               "per_step_bytes": layers * (fwd + bwd), "by_op": t}
    text = program.compiled.as_text()
    kernel = collective_bytes(text, op_name="/shard_map/")  # only the ring kernel runs inside a shard_map
    step = collective_bytes(text)
    return {
        "sequence": n, "strategy": m.context_parallel, "layers": layers, "rows_per_device": rows,
        "tokens_per_device": cfg.data.seq_len // n, "per_layer": per_layer,
        "compiled_attention_bytes": sum(kernel.values()), "compiled_attention_by_op": kernel,
        "compiled_step_bytes": sum(step.values()), "compiled_step_by_op": step,
        "definition": "bytes each device sends over the interconnect per step (all-gather: the (N-1) shards that "
                      "reach it; reduce-scatter: the (N-1) partial shards it passes on; all-reduce: 2 (N-1)/N x "
                      "the operand)",
    }


def format_plan(result: dict[str, Any]) -> str:
    m = result["model_config"]
    lines = [
        f"jaxctx plan: {result['config_path'] or '(embedded default)'}"
        + (f" {' '.join('--set ' + o for o in result['overrides'])}" if result["overrides"] else ""),
        f"model {m['family']} {m['num_layers']}x{m['d_model']}, {m['num_heads']} heads, vocab {m['vocab_size']}, "
        f"{result['params']['total'] / 1e6:.2f}M params, {m['dtype']} compute; T={result['seq_len']}, "
        f"global batch {result['batch']}, mesh {result['mesh']}",
        "",
    ]
    width = max(len(r["component"]) for r in result["rows"])
    for r in result["rows"]:
        size = "?" if r["bytes"] is None else format_bytes(r["bytes"])
        lines.append(f"  {r['component']:<{width}}  {size:>11}   {r['note']}")
    cap = result["capacity"]
    cap_text = "unknown" if cap["bytes"] is None else format_bytes(cap["bytes"])
    lines.append("")
    if result["fits"] is None:
        lines.append(f"capacity: {cap_text} ({cap['source']}): cannot tell whether it fits")
    else:
        verdict = "fits" if result["fits"] else "DOES NOT FIT"
        lines.append(f"{verdict}: {100 * result['fraction_of_capacity']:.1f}% of {cap_text} ({cap['source']})")
    if result.get("communication"):
        lines += ["", *format_communication(result["communication"])]
    if result["top_temp_buffers"]:
        lines += ["", "largest temp slots (XLA buffer assignment; each slot is reused by the values listed):"]
        for s in result["top_temp_buffers"]:
            lines.append(f"  {s['mib']:>10.1f} MiB  {s['shapes'][:150]}")
    return "\n".join(lines)


def format_communication(c: dict[str, Any]) -> list[str]:
    """The context-parallel traffic table of `jaxctx plan`."""
    layers = c["layers"]
    lines = [f"interconnect, bytes each device sends per step: parallel.sequence={c['sequence']} "
             f"({c['tokens_per_device']} tokens and {c['rows_per_device']} rows per device), {layers} layers",
             f"  {'attention, per layer':<22} {'forward':>11} {'backward':>11} {'fwd+bwd':>11} "
             f"{f'x {layers} layers':>11}"]
    for strategy, t in c["per_layer"].items():
        mark = " (configured)" if strategy == c["strategy"] else ""
        lines.append(f"  {strategy + mark:<22} {format_bytes(t['fwd_bytes']):>11} {format_bytes(t['bwd_bytes']):>11} "
                     f"{format_bytes(t['fwd_bwd_bytes']):>11} {format_bytes(t['per_step_bytes']):>11}")
    ops = ", ".join(f"{k} {format_bytes(v)}" for k, v in c["compiled_step_by_op"].items())
    lines += [f"  compiled step: the {c['strategy']} kernel sends {format_bytes(c['compiled_attention_bytes'])} "
              f"(more than {layers} x fwd+bwd when remat recomputes the forward); all collectives "
              f"{format_bytes(c['compiled_step_bytes'])} ({ops})"]
    return lines
