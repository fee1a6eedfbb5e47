"""Bytes a compiled program sends over the interconnect, counted from its optimised HLO text.

An independent check of the figures `jaxctx.ops.ring.ring_traffic` derives from shapes: this reads what XLA
actually kept after optimisation (`Compiled.as_text()`), so a transfer the compiler added, fused away or changed
the dtype of shows up here and not there.

Per device and per execution of the program, by op (g = devices in the op's replica group):
- `collective-permute`: its operand (each device sends one buffer to one peer);
- `all-gather`: result - operand, i.e. (g-1) x operand (the shards of the g-1 others pass through, as in a
  ring or any bandwidth-optimal algorithm);
- `reduce-scatter`: operand - result, i.e. (g-1) x result;
- `all-to-all`: (g-1)/g x operand; `all-reduce`: 2 (g-1)/g x operand (reduce-scatter + all-gather).
Ops inside a `while` body count once per iteration (XLA records `known_trip_count` for `fori_loop`s); a loop
without a known trip count is an error rather than a silent under-count. Ops in both branches of a
`conditional` are all counted (an upper bound; the ring kernel puts none there).
"""

from __future__ import annotations

import re
from collections import defaultdict

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("collective-permute", "all-gather", "reduce-scatter", "all-to-all", "all-reduce")

HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")  # also read by step_profile
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\((.*)$")  # name, type, opcode, rest
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _bytes_of(type_text: str) -> int:
    """Bytes of an HLO type: an array `f32[1,64,2,16]{3,2,1,0}` or a tuple of them (summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _DTYPE_BYTES:
            continue  # token[] and the like carry no data
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES[dtype]
    return total


def _group_size(attrs: str) -> int | None:
    """Devices per replica group, from any of the three forms XLA prints."""
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)  # explicit: {{0,1},{2,3}}
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota: [groups, size]<=[devices]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)  # mesh[axes] {reduced axes}
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        size = 1
        for axis in re.findall(r"'([^']+)'", m.group(2)):
            size *= int(sizes[axis])
        return size
    return None


def _operands(args: str) -> list[str]:
    """Names of an instruction's operands: `%a, %b, /*index=5*/%c), attrs...` -> [a, b, c]."""
    return re.findall(r"%([^\s,)]+)", args.split(")")[0])


def collective_bytes(hlo_text: str, op_name: str | None = None) -> dict[str, int]:
    """{op kind: bytes each device sends per execution} for the collectives of an optimised HLO module.

    `op_name`: count only collectives whose metadata op_name contains it (e.g. "/shard_map/": the ring
    kernel's own transfers inside a train step, without the gradient all-reduces and resharding around it)."""
    types: dict[str, str] = {}  # instruction name (parameters included) -> its result type text
    ops: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)  # computation -> (name, type, op, rest)
    calls: dict[str, list[tuple[str, int | None]]] = defaultdict(list)  # computation -> [(callee, times)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = HLO_COMPUTATION.match(line)
        if head and "=" not in line.split("(")[0]:
            current = head.group(1)
            if line.startswith("ENTRY"):
                entry = current
            continue
        inst = HLO_INSTRUCTION.match(line)
        if not inst or current is None:
            continue
        name, type_text, op, rest = inst.groups()
        types[name] = type_text
        ops[current].append((name, type_text, op, rest))
        if op == "while":
            body = re.search(r"body=%([^\s,]+)", rest).group(1)
            trip = _TRIP.search(rest)
            calls[current].append((body, int(trip.group(1)) if trip else None))
        else:
            for callee in re.findall(r"(?:to_apply|calls|true_computation|false_computation)=%([^\s,}]+)", rest):
                calls[current].append((callee, 1))
            for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
                calls[current] += [(c.strip().lstrip("%"), 1) for c in branches.split(",")]
    if entry is None:
        raise ValueError("collective_bytes: no ENTRY computation in the HLO text")

    totals: dict[str, int] = defaultdict(int)

    def visit(comp: str, times: int, seen: frozenset) -> None:
        for name, type_text, op, rest in ops.get(comp, ()):
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in COLLECTIVES:
                continue
            if op_name is not None and op_name not in (re.findall(r'op_name="([^"]*)"', rest) or [""])[0]:
                continue
            # Combined collectives take several operands (and return a tuple): sum them.
            in_bytes = sum(_bytes_of(types.get(name_, "")) for name_ in _operands(rest))
            out_bytes = _bytes_of(type_text)
            if op.endswith("-start"):  # async form: the result is (operand, output[, scratch])
                out_bytes = max(out_bytes - in_bytes, 0)
            g = _group_size(rest)
            if kind == "collective-permute":
                sent = in_bytes
            elif kind == "all-gather":
                sent = out_bytes - in_bytes
            elif kind == "reduce-scatter":
                sent = in_bytes - out_bytes
            elif g is None:
                raise ValueError(f"collective_bytes: {op} %{name} has no replica groups to size it by")
            elif kind == "all-to-all":
                sent = in_bytes * (g - 1) // g
            else:  # all-reduce
                sent = 2 * in_bytes * (g - 1) // g
            totals[kind] += times * sent
        for callee, n in calls.get(comp, ()):
            if callee in seen:
                continue
            if n is None:
                if any(op in COLLECTIVES or op.endswith("-start") for _, _, op, _ in ops.get(callee, ())):
                    raise ValueError(f"collective_bytes: a while loop around collectives ({callee}) has no "
                                     f"known trip count; its transfers cannot be counted")
                n = 1
            visit(callee, times * n, seen | {callee})

    visit(entry, 1, frozenset({entry}))
    return dict(totals)
