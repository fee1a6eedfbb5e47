"""Where a compiled step's time goes: a profiler trace's per-op times, grouped by what each HLO op does.

`jaxctx bench train --profile` traces a few steps (after timing) and reads two things back:

- the trace (`jax.profiler` with a Perfetto JSON): XLA:CPU runs one thunk per HLO instruction and names its
  trace event after the instruction (`dot.256`, `ynn_fusion.43`, `copy_bitcast_fusion.8`, `while.205`, ...);
  nested events (the body of a `while` or `conditional`) are subtracted from their parent, so each op counts its
  own (exclusive) time once;
- the compiled module's HLO text (`Compiled.as_text()`), which says what each instruction is: its opcode and, for a
  fusion, the ops of the fused computation.

Categories (`CATEGORIES`): `matmul` (dot / convolution, or a fusion containing one: XLA:CPU's XNNPACK `ynn_fusion`s
are dots with their epilogue), `copy/layout` (copy, transpose, slicing, concatenation, padding, dynamic updates, or
a fusion of nothing else), `reduce` (reductions, sort, or a fusion whose work includes one), `elementwise` (the
other fusions and ops), `collective` (all-reduce, all-gather, ...), `control` (the loops' and branches' own
bookkeeping), `other`. Times are summed over every thread that ran an op, so with intra-op threads the op time can
exceed the wall time; the shares are of the op time.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections import defaultdict

from jaxctx.bench.collectives import HLO_COMPUTATION, HLO_INSTRUCTION

CATEGORIES = ("matmul", "copy/layout", "reduce", "elementwise", "collective", "control", "other")
MATMUL_OPS = {"dot", "convolution"}
LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
              "dynamic-update-slice", "concatenate", "pad", "reverse", "gather", "scatter", "copy-start", "copy-done",
              "bitcast-convert"}
STRUCTURE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "iota"}  # no work of their own
REDUCE_OPS = {"reduce", "reduce-window", "sort", "select-and-scatter"}
COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
                  "all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
                  "collective-permute-start", "collective-permute-done", "send", "recv", "send-done", "recv-done"}
CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-done"}
OTHER_OPS = {"rng", "rng-bit-generator", "rng-get-and-update-state", "infeed", "outfeed", "custom-call",
             "partition-id", "replica-id", "after-all", "opt-barrier", "optimization-barrier"}

_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """(instructions {name: {"opcode", "calls", "op_name", "target"}}, computations {name: [opcodes]})."""
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith(" ") and (match := HLO_COMPUTATION.match(line)):
            current = match.group(1)
            computations[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        match = HLO_INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        name, _, opcode, rest = match.groups()
        calls, op_name, target = (pattern.search(rest) for pattern in (_CALLS, _OP_NAME, _TARGET))
        instructions[name] = {"opcode": opcode, "calls": calls.group(1) if calls else None,
                              "op_name": op_name.group(1) if op_name else "", "target": target.group(1) if target else ""}
        computations[current].append(opcode)
    return instructions, computations


def category(info: dict, computations: dict[str, list[str]]) -> str:
    """The CATEGORIES entry of one instruction (see the module docstring)."""
    op = info["opcode"]
    if op == "fusion":
        ops = set(computations.get(info["calls"] or "", ())) - STRUCTURE_OPS
        if ops & MATMUL_OPS:
            return "matmul"
        if ops & REDUCE_OPS:
            return "reduce"
        if ops <= LAYOUT_OPS:
            return "copy/layout"
        return "elementwise"
    if op in MATMUL_OPS:
        return "matmul"
    if op == "custom-call" and re.search(r"matmul|gemm|dot", info["target"], re.I):
        return "matmul"
    for name, ops in (("copy/layout", LAYOUT_OPS), ("reduce", REDUCE_OPS), ("collective", COLLECTIVE_OPS),
                      ("control", CONTROL_OPS), ("other", OTHER_OPS | STRUCTURE_OPS)):
        if op in ops:
            return name
    return "elementwise"


def find_trace(trace_dir: str) -> str:
    """The newest Perfetto trace under a `jax.profiler.trace` directory."""
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (traced with create_perfetto_trace?)")
    return found[-1]


def exclusive_times(events: list[dict], names: set[str]) -> dict[str, float]:
    """Microseconds per op name, each event's duration minus that of the op events nested directly inside it (the
    same thread), summed over events. Events whose name is not an op (runtime bookkeeping) are left out."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    total: dict[str, float] = defaultdict(float)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [end, name, exclusive]
        for e in thread:
            start, dur = e["ts"], e.get("dur", 0)
            while stack and stack[-1][0] <= start:
                _, name, own = stack.pop()
                total[name] += own
            if stack:
                stack[-1][2] -= dur
            stack.append([start + dur, e["name"], dur])
        for _, name, own in stack:
            total[name] += own
    return dict(total)


def breakdown(trace_dir: str, hlo_text: str, steps: int, *, top: int = 12) -> dict:
    """Per-step op time by category and the most expensive ops, from a trace of `steps` calls of the module."""
    instructions, computations = parse_hlo(hlo_text)
    with gzip.open(find_trace(trace_dir), "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    times = exclusive_times(events, set(instructions))
    if not times:
        raise ValueError(f"the trace in {trace_dir} has no event named after an instruction of the module")
    per_category: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        per_category[category(instructions[name], computations)] += us
    op_us = sum(times.values())
    rows = [{"category": c, "ms_per_step": round(per_category[c] / 1e3 / steps, 3),
             "share": round(per_category[c] / op_us, 4)} for c in CATEGORIES if per_category.get(c)]
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    ops = [{"op": name, "category": category(instructions[name], computations),
            "ms_per_step": round(us / 1e3 / steps, 3), "share": round(us / op_us, 4),
            "source": _short_source(instructions[name]["op_name"])} for name, us in ranked]
    return {"steps": steps, "op_ms_per_step": round(op_us / 1e3 / steps, 3), "categories": rows, "top_ops": ops}


def _short_source(op_name: str) -> str:
    """`jit(train_step)/transpose(jvp(CausalLM.loss))/.../layers/mlp/dot_general` -> `bwd .../layers/mlp/dot_general`."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    tail = op_name.split("/")
    return f"{direction} {'/'.join(tail[-3:])}" if op_name else ""


def format_breakdown(profile: dict, step_ms: float | None = None) -> str:
    """The table `jaxctx bench train --profile` prints."""
    lines = [f"op time per step {profile['op_ms_per_step']:,.1f} ms"
             + (f" (wall {step_ms:,.1f} ms)" if step_ms else "") + f", from {profile['steps']} traced steps:"]
    lines += [f"  {r['category']:<12} {r['ms_per_step']:>10,.1f} ms  {100 * r['share']:5.1f}%"
              for r in profile["categories"]]
    lines.append("  most expensive ops:")
    lines += [f"    {r['op']:<34} {r['category']:<12} {r['ms_per_step']:>9,.1f} ms  {100 * r['share']:5.1f}%  "
              f"{r['source']}" for r in profile["top_ops"]]
    return "\n".join(lines)
