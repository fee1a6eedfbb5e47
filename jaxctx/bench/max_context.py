"""`jaxctx bench max-context`: the longest sequence whose train step fits a memory budget, per variant.

Our version of the max-context table of the Blockwise Parallel Transformer paper (Liu & Abbeel, 2023,
arXiv:2305.19370, Table 2). Three variants of one config, all with the same remat policy (and remat group size):

  vanilla           materialised attention (`reference`: [B, H, T, T] scores), whole-sequence MLP and loss
  memory_efficient  blockwise attention only (Rabe & Staats 2021 / FlashAttention); MLP and loss unchunked
  blockwise         blockwise attention + blockwise (chunked, rematerialised) MLP + chunked cross-entropy

Context parallelism (`--sequence 1,2,4,8`): the blockwise variant is searched once per N with each sequence
split over N devices (`parallel.sequence=N`, ring attention; N x fsdp x tensor devices, data = 1), so the table
shows how the per-device-budget context grows with the devices one sequence spans (ideal: N times).

Nothing runs: each probe compiles the real train step ahead of time for abstract inputs and reads
`memory_analysis()`; a length fits when the compiled total per device -- arguments + outputs - aliased (donated
state) + temp -- is within the budget. The search doubles T from `start` until a probe does not fit, then bisects
between the last fit and the first miss to a multiple of `granularity`. Memory is assumed to grow with T (it
does for these programs; the probes are recorded so a reader can check).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxctx import config as config_lib
from jaxctx.bench.machine import machine_info
from jaxctx.bench.measure import GIB, format_bytes, mib, sig
from jaxctx.bench.trainstep import build_runner, compile_step, compile_with_report, config_at, pick_devices, \
    state_bytes
from jaxctx.parallel import mesh_shape
from jaxctx.errors import UsageError
from jaxctx.platform import check_platform

SCHEMA_VERSION = 1
VARIANTS = ("vanilla", "memory_efficient", "blockwise")
DEFAULT_CHUNK = 2048  # blockwise variant's mlp_chunk / loss_chunk when the config has none
MEMORY_COUNTED = "arguments + outputs - aliased (donated state) + temp, per device, from Compiled.memory_analysis()"


def variant_overrides(variant: str, *, mlp_chunk: int, loss_chunk: int) -> dict[str, Any]:
    """ModelConfig fields that define a variant (the remat policy is shared and set separately)."""
    if variant == "vanilla":
        return {"attention": "reference", "mlp_chunk": 0, "loss_chunk": 0}
    if variant == "memory_efficient":
        return {"attention": "blockwise", "mlp_chunk": 0, "loss_chunk": 0}
    if variant == "blockwise":
        return {"attention": "blockwise", "mlp_chunk": mlp_chunk, "loss_chunk": loss_chunk}
    raise UsageError(f"--variants: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    max_seq_len: int  # longest probed multiple of the granularity that fits (0: not even the smallest)
    first_miss: int | None  # shortest probed length that did not fit (None: hit the limit while fitting)
    probes: tuple[tuple[int, bool], ...]  # (T, fits) in probe order


def search_max_len(fits: Callable[[int], bool], *, start: int, granularity: int, limit: int) -> SearchResult:
    """Longest T (a multiple of `granularity`, <= `limit`) with fits(T), by doubling from `start` then bisection.

    Assumes fits is monotone (true up to some T, false after). `start` is rounded up to the granularity.
    """
    for name, value in (("start", start), ("granularity", granularity), ("limit", limit)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    probes: list[tuple[int, bool]] = []

    def probe(t: int) -> bool:
        ok = bool(fits(t))
        probes.append((t, ok))
        return ok

    t = min(-(-start // granularity) * granularity, limit // granularity * granularity)
    if t < granularity:
        raise UsageError(f"limit {limit} is below the granularity {granularity}")
    lo, hi = 0, None  # lo fits (0 = nothing known to fit), hi does not
    while True:  # doubling
        if probe(t):
            lo = t
            if t >= limit // granularity * granularity:
                return SearchResult(lo, None, tuple(probes))
            t = min(2 * t, limit // granularity * granularity)
        else:
            hi = t
            break
    while hi - lo > granularity:  # bisection on multiples of the granularity
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            mid = lo + granularity
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, tuple(probes))


@dataclasses.dataclass(frozen=True)
class MaxContextConfig:
    config: str | None
    budget_gb: float  # GiB per device
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] = VARIANTS
    remat_policy: str | None = None  # shared by every variant; None = the config's
    mlp_chunk: int | None = None  # blockwise variant; None = the config's, or DEFAULT_CHUNK if it has none
    loss_chunk: int | None = None
    granularity: int = 512  # lengths probed are multiples of this
    start: int = 1024  # first probe
    limit: int = 1 << 22  # stop doubling here (4M tokens)
    batch: int | None = None  # global batch; None = one sequence per data-parallel device
    devices: int | None = None
    buffers: int = 0  # list this many of the largest temp slots of each variant at its max length (XLA report)
    sequence: tuple[int, ...] = ()  # context-parallel sizes to sweep (blockwise variant only); () = config's mesh

    def validated(self) -> "MaxContextConfig":
        if not isinstance(self.budget_gb, (int, float)) or isinstance(self.budget_gb, bool) or \
                not self.budget_gb > 0:
            raise UsageError(f"--budget-gb must be a positive number of GiB, got {self.budget_gb!r}")
        if not self.variants:
            raise UsageError(f"--variants is empty; choose from {', '.join(VARIANTS)}")
        for v in self.variants:
            if v not in VARIANTS:
                raise UsageError(f"--variants: unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
        if self.remat_policy is not None and self.remat_policy not in config_lib.REMAT_POLICIES:
            raise UsageError(f"--remat-policy: unknown policy {self.remat_policy!r}; valid: "
                             f"{', '.join(config_lib.REMAT_POLICIES)}")
        for name in ("granularity", "start", "limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"--{name} must be a positive integer, got {value!r}")
        for name in ("mlp_chunk", "loss_chunk", "batch", "devices"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.limit < self.granularity:
            raise UsageError(f"--limit {self.limit} must be at least --granularity {self.granularity}")
        if not isinstance(self.buffers, int) or self.buffers < 0:
            raise UsageError(f"--buffers must be a non-negative integer, got {self.buffers!r}")
        for n in self.sequence:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise UsageError(f"--sequence sizes must be positive integers, got {n!r}")
        if self.sequence and self.devices is not None:
            raise UsageError("--sequence picks the devices itself (N x fsdp x tensor for each N); drop --devices")
        if self.sequence and any(v != "blockwise" for v in self.variants) and self.variants != VARIANTS:
            raise UsageError("--sequence sweeps the blockwise variant (the ring kernel is blockwise); drop --variants "
                             "or pass --variants blockwise")
        if self.sequence and self.granularity % (2 * max(self.sequence)):
            raise UsageError(f"--granularity {self.granularity} must be divisible by 2 x the largest --sequence "
                             f"({2 * max(self.sequence)}): the zigzag layout splits T into 2N equal chunks")
        variants = ("blockwise",) if self.sequence else tuple(dict.fromkeys(self.variants))
        return dataclasses.replace(self, variants=variants, overrides=tuple(self.overrides),
                                   sequence=tuple(dict.fromkeys(self.sequence)))


def run_max_context(mc: MaxContextConfig, *, progress: Callable[[str], None] = lambda line: None,
                    on_row: Callable[[dict], None] = lambda result: None) -> dict[str, Any]:
    """Search every variant; return the JSON-ready result {"bench": "max-context", ..., "rows", "probes"}."""
    mc = mc.validated()
    base = config_lib.load(mc.config, list(mc.overrides))
    check_platform(base)
    # The question is how long one sequence per device can be: the step takes its whole batch at once (no
    # gradient accumulation, whose extra gradient buffer -- learned position tables included -- would be
    # charged to the context).
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=1))
    remat = mc.remat_policy or base.model.remat_policy
    mlp_chunk = mc.mlp_chunk or base.model.mlp_chunk or DEFAULT_CHUNK
    loss_chunk = mc.loss_chunk or base.model.loss_chunk or DEFAULT_CHUNK
    budget = int(mc.budget_gb * GIB)

    def model_fields(variant: str, n: int) -> dict[str, Any]:
        fields = {**variant_overrides(variant, mlp_chunk=mlp_chunk, loss_chunk=loss_chunk), "remat_policy": remat,
                  "remat_group_size": base.model.remat_group_size}
        if n > 1:
            fields["attention"] = "auto"  # the ring kernel: the only attention that splits a sequence
        return fields

    # One search per (sequence size, variant): the config's own mesh, or each --sequence N on its own devices.
    searches = []  # (variant, n, config, devices, batch)
    for n in mc.sequence or (None,):
        cfg_n = base
        if n is None:
            devices = pick_devices(mc.devices)
        else:
            parallel = dataclasses.replace(base.parallel, data=1, sequence=n)
            cfg_n = dataclasses.replace(base, parallel=parallel)
            devices = pick_devices(n * parallel.fsdp * parallel.tensor)
        data, fsdp, sequence, _ = mesh_shape(cfg_n.parallel, len(devices))
        batch = mc.batch if mc.batch is not None else data * fsdp
        searches += [(variant, sequence, cfg_n, devices, batch) for variant in mc.variants]

    # The state alone must fit: params + optimizer state at the smallest length (learned position tables grow
    # with T, so this is a lower bound). Checked up front so a hopeless budget is an error, not a 0 in a table.
    _, n0, cfg0, devices0, batch0 = searches[0]
    smallest = state_bytes(build_runner(
        config_at(cfg0, seq_len=mc.granularity, batch=batch0, model=model_fields("blockwise", n0)), devices0))
    state_total = smallest["params"] + smallest["opt_state"]
    if state_total > budget:
        raise UsageError(f"--budget-gb {mc.budget_gb:g} ({format_bytes(budget)}) is below the parameter + optimizer "
                         f"memory of this config ({format_bytes(state_total)} per device: params "
                         f"{format_bytes(smallest['params'])}, optimizer state "
                         f"{format_bytes(smallest['opt_state'])}); raise the budget or shard the state "
                         f"(parallel.fsdp)")
    result: dict[str, Any] = {
        "bench": "max-context",
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "machine": machine_info(),
        "config": {**dataclasses.asdict(mc), "devices_used": len(devices0), "batch_used": batch0,
                   "remat_policy_used": remat, "mlp_chunk_used": mlp_chunk, "loss_chunk_used": loss_chunk},
        "model_config": dataclasses.asdict(base.model),
        "budget": {"gib": mc.budget_gb, "bytes": budget, "counted": MEMORY_COUNTED},
        "memory_budget": {"bytes": budget, "gib": mc.budget_gb, "source": f"--budget-gb {mc.budget_gb:g}",
                          "applies_to": MEMORY_COUNTED},
        "search": (f"doubling from {mc.start} until a length does not fit, then bisection to a multiple of "
                   f"{mc.granularity} (limit {mc.limit}); AOT compile only, nothing runs"),
        "variants": {v: model_fields(v, n0) for v in mc.variants},
        "state_bytes_per_device": state_total,
        "rows": [],
        "probes": [],
    }
    for variant, n, cfg_n, devices, batch in searches:
        memo: dict[int, tuple] = {}  # T -> (CompiledMemory, state bytes)
        fields = model_fields(variant, n)
        label = f"{variant} sequence={n}" if mc.sequence else variant

        def fits(t: int, cfg_n=cfg_n, devices=devices, batch=batch, fields=fields, label=label, memo=memo) -> bool:
            cfg = config_at(cfg_n, seq_len=t, batch=batch, model=fields)
            program = compile_step(cfg, devices=devices)
            mem = program.memory
            total = mem.total_bytes
            ok = total is not None and total <= budget
            memo[t] = (mem, program.state_bytes)  # not the program itself: compiled executables are large
            probe_row = {"variant": variant, "label": label, "sequence": n, "seq_len": t, "fits": ok,
                         "total_bytes": total, "total_gib": None if total is None else sig(total / GIB, 4),
                         "temp_gib": None if mem.temp_bytes is None else sig(mem.temp_bytes / GIB, 4),
                         "argument_gib": None if mem.argument_bytes is None else sig(mem.argument_bytes / GIB, 4),
                         "compile_s": round(program.compile_s, 2)}
            result["probes"].append(probe_row)
            progress(f"  {label:>16} T={t:<8} {format_bytes(total) if total is not None else '?':>10} "
                     f"{'fits' if ok else 'over'} budget ({program.compile_s:.1f}s compile)")
            return ok

        progress(f"{label}: searching on {len(devices)} device(s) (remat={remat}, {fields}) ...")
        found = search_max_len(fits, start=mc.start, granularity=mc.granularity, limit=mc.limit)
        row = {"label": label, **_row(variant, found, memo, fields, batch), "sequence": n, "devices": len(devices)}
        if mc.buffers and found.max_seq_len:
            cfg = config_at(cfg_n, seq_len=found.max_seq_len, batch=batch, model=fields)
            _, slots = compile_with_report(cfg, devices=devices, top=mc.buffers)
            row["top_temp_buffers"] = [{"mib": mib(s["bytes"]), "values": s["values"], "shapes": s["shapes"]}
                                       for s in slots]
        result["rows"].append(row)
        progress(f"{label}: max_seq_len {row['max_seq_len']} ({row['total_gib']} GiB)")
        on_row(result)
    result["ratios"] = ratios(result["rows"])
    result["complete"] = True
    return result


def _row(variant: str, found: SearchResult, memo: dict, fields: dict, batch: int) -> dict[str, Any]:
    mem, state = memo.get(found.max_seq_len, (None, None))
    # What one more token of context costs near the limit: the slope of memory over the upper half of the fitting
    # range (neighbouring probes are too close: XLA's layouts and padding make memory step, not glide).
    per_token = None
    lower = [t for t, ok in found.probes if ok and t <= found.max_seq_len // 2]
    if mem is not None and lower and mem.total_bytes is not None:
        t0 = max(lower)
        m0 = memo[t0][0].total_bytes
        if m0 is not None:
            per_token = sig((mem.total_bytes - m0) / ((found.max_seq_len - t0) * batch))

    def gib(n):
        return None if n is None else sig(n / GIB, 4)

    return {
        "variant": variant, "max_seq_len": found.max_seq_len, "batch": batch,
        "limited_by": "budget" if found.first_miss is not None else "search limit",
        "first_miss": found.first_miss,
        "total_gib": gib(mem.total_bytes) if mem else None,
        "temp_gib": gib(mem.temp_bytes) if mem else None,
        "argument_gib": gib(mem.argument_bytes) if mem else None,
        "output_gib": gib(mem.output_bytes) if mem else None,
        "alias_gib": gib(mem.alias_bytes) if mem else None,
        "params_gib": gib(state["params"]) if state else None,
        "opt_state_gib": gib(state["opt_state"]) if state else None,
        "bytes_per_token_near_max": per_token,
        "probes": len(found.probes),
        **{k: fields[k] for k in ("attention", "mlp_chunk", "loss_chunk", "remat_policy", "remat_group_size")},
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """blockwise / vanilla and blockwise / memory_efficient max lengths (the BPT paper's comparison); with a
    --sequence sweep, each N's blockwise max length over the N = 1 one (ideal: N)."""
    by_n = {r.get("sequence", 1): r["max_seq_len"] for r in rows if r["variant"] == "blockwise"}
    if len(by_n) > 1:
        one = by_n.get(1)
        return {f"blockwise_sequence_{n}_over_1": sig(t / one, 4) if one else None for n, t in by_n.items()
                if n != 1}
    by = {r["variant"]: r["max_seq_len"] for r in rows}
    out = {}
    for other in ("vanilla", "memory_efficient"):
        if "blockwise" in by and other in by:
            out[f"blockwise_over_{other}"] = sig(by["blockwise"] / by[other], 4) if by[other] else None
    return out
