"""Writers shared by every bench: a readable stdout table, JSON, CSV and a PNG plot.

A bench produces one JSON-ready dict: {"bench": name, "machine": {...}, "rows": [{...}, ...], ...}. How a bench
is shown (table columns, plot panels, which field is the x axis and which names a line) is a `Layout` in
`LAYOUTS`, keyed by the bench name, so adding `bench train` or `bench max-context` means adding a layout here,
not new writers.

File outputs of `--out FILE.json`: FILE.json (everything), FILE.csv (the rows, each with the machine's fields
so a CSV alone says where it was measured) and FILE.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable

from jaxctx.bench.measure import GIB, MIB, format_bytes
from jaxctx.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Column:
    key: str  # row field
    header: str
    fmt: Callable[[Any], str] = str  # applied to non-None values; None prints as "-"


@dataclasses.dataclass(frozen=True)
class Panel:
    key: str  # row field on the y axis
    label: str  # y axis label
    log_y: bool = True  # times and memory span orders of magnitude across a T sweep


@dataclasses.dataclass(frozen=True)
class Layout:
    columns: tuple[Column, ...]
    panels: tuple[Panel, ...]
    x: str  # row field on the (log-2) x axis
    x_label: str
    series: str  # row field naming one line per value
    budget_panel: str | None = None  # panel key that gets the memory budget as a horizontal line
    budget_unit: int = MIB  # bytes per unit of the budget panel's field
    plot_rows: str = "rows"  # result key holding the rows to plot (max-context plots its probes)


def _f(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:,.{digits}f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


LAYOUTS: dict[str, Layout] = {
    "attention": Layout(
        columns=(
            Column("impl", "impl"),
            Column("sequence", "N"),
            Column("seq_len", "T"),
            Column("fwd_ms", "fwd ms", _f(2)),
            Column("fwd_bwd_ms", "fwd+bwd ms", _f(2)),
            Column("fwd_gflop_per_s", "fwd GFLOP/s", _f(1)),
            Column("fwd_bwd_gflop_per_s", "f+b GFLOP/s", _f(1)),
            Column("fwd_bwd_matmul_fraction", "f+b/matmul", _pct),
            Column("fwd_temp_mib", "fwd temp MiB", _f(1)),
            Column("fwd_bwd_temp_mib", "f+b temp MiB", _f(1)),
            Column("fwd_sent_mib", "fwd sent MiB", _f(2)),
            Column("fwd_bwd_sent_mib", "f+b sent MiB", _f(2)),
            Column("status", "status"),
        ),
        panels=(Panel("fwd_bwd_ms", "fwd+bwd time (ms)"), Panel("fwd_bwd_temp_mib", "fwd+bwd temp memory (MiB)")),
        x="seq_len", x_label="sequence length T", series="impl", budget_panel="fwd_bwd_temp_mib",
    ),
    "train": Layout(
        columns=(
            Column("variant", "variant"),
            Column("seq_len", "T"),
            Column("batch", "B"),
            Column("step_ms", "step ms", _f(0)),
            Column("tokens_per_s", "tokens/s", _f(1)),
            Column("achieved_tflop_per_s", "TFLOP/s", _f(4)),
            Column("mfu", "MFU", _pct),
            Column("total_mib", "compiled MiB", _f(0)),
            Column("temp_mib", "temp MiB", _f(0)),
            Column("speedup_vs_hf", "vs HF", lambda v: f"{v:.2f}x"),
            Column("status", "status"),
        ),
        panels=(Panel("tokens_per_s", "tokens/s"), Panel("mfu", "MFU (model FLOP/s / peak)", log_y=False),
                Panel("total_mib", "compiled memory per device (MiB)")),
        x="seq_len", x_label="sequence length T", series="variant", budget_panel="total_mib",
    ),
    "max-context": Layout(
        columns=(
            Column("label", "variant"),
            Column("sequence", "sequence"),
            Column("devices", "devices"),
            Column("max_seq_len", "max T"),
            Column("total_gib", "total GiB", _f(2)),
            Column("temp_gib", "temp GiB", _f(2)),
            Column("argument_gib", "args GiB", _f(2)),
            Column("bytes_per_token_near_max", "bytes/token", _f(0)),
            Column("attention", "attention"),
            Column("mlp_chunk", "mlp_chunk"),
            Column("loss_chunk", "loss_chunk"),
            Column("remat_policy", "remat"),
            Column("limited_by", "limited by"),
        ),
        panels=(Panel("total_gib", "compiled memory per device (GiB)"),),
        x="seq_len", x_label="sequence length T (probes)", series="label", budget_panel="total_gib",
        budget_unit=GIB, plot_rows="probes",
    ),
    "generate": Layout(
        columns=(
            Column("impl", "impl"),
            Column("batch", "B"),
            Column("prompt", "prompt"),
            Column("new_tokens", "new"),
            Column("prefill_s", "prefill s", _f(3)),
            Column("prefill_tokens_per_s", "prefill tok/s", _f(0)),
            Column("decode_s", "decode s", _f(3)),
            Column("decode_tokens_per_s", "decode tok/s", _f(1)),
            Column("decode_speedup_vs_hf", "decode vs HF", lambda v: f"{v:.2f}x"),
            Column("compile_s", "compile s", _f(1)),
            Column("first_difference", "tokens differ at"),
        ),
        panels=(Panel("decode_tokens_per_s", "decode tokens/s"), Panel("prefill_tokens_per_s", "prefill tokens/s")),
        x="prompt", x_label="prompt length (tokens)", series="label",
    ),
}


def _layout(result: dict[str, Any]) -> Layout:
    name = result.get("bench")
    if name not in LAYOUTS:
        raise ValueError(f"no report layout for bench {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# ----------------------------------------------------------------------------------------------------------
# stdout
# ----------------------------------------------------------------------------------------------------------

def format_table(rows: list[dict[str, Any]], columns: tuple[Column, ...]) -> str:
    """Fixed-width text table; numbers right-aligned, text left-aligned, None as "-"."""
    cells = [[("-" if r.get(c.key) is None else c.fmt(r[c.key])) for c in columns] for r in rows]
    widths = [max([len(c.header)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c.key), (int, float)) or r.get(c.key) is None for r in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def machine_summary(machine: dict[str, Any]) -> str:
    """One line naming the machine, for table headers and plot titles."""
    return (f"{machine.get('backend')} x{machine.get('device_count')} ({machine.get('device_kind')}), "
            f"CPU {machine.get('cpu_model')} x{machine.get('usable_cpu_count')} cores, "
            f"jax {machine.get('jax_version')}, {machine.get('date')}")


def format_report(result: dict[str, Any]) -> str:
    """The full stdout report: machine, conventions, reference rate, then the table."""
    layout = _layout(result)
    lines = [f"jaxctx bench {result['bench']} on {machine_summary(result['machine'])}"]
    cfg = result.get("config", {})
    if result["bench"] == "attention":
        lines.append(f"B={cfg.get('batch')} H={cfg.get('heads')} Hkv={cfg.get('kv_heads')} D={cfg.get('head_dim')} "
                     f"{cfg.get('dtype')} {'causal' if cfg.get('causal') else 'non-causal'}; "
                     f"{result.get('timing', '')}")
    if result["bench"] == "train":
        lines.append(f"{cfg.get('config') or '(embedded default)'}; {result.get('batch_policy', '')}; "
                     f"{result.get('timing', '')}")
    if result["bench"] == "max-context":
        b = result["budget"]
        lines.append(f"{cfg.get('config') or '(embedded default)'}: budget {b['gib']:g} GiB per device counting "
                     f"{b['counted']}; remat_policy={cfg.get('remat_policy_used')} for every variant; "
                     f"batch {cfg.get('batch_used')}; {result.get('search', '')}")
    if result["bench"] == "generate":
        lines.append(f"{cfg.get('config') or '(embedded default)'}: {cfg.get('layers')} layers x {cfg.get('d_model')}, "
                     f"{cfg.get('params', 0) / 1e6:.1f}M params, greedy, {cfg.get('new_tokens')} new tokens; "
                     f"{result.get('timing', '')}")
    if "flop_convention" in result:
        lines.append(f"FLOPs: {result['flop_convention']}")
    if "matmul" in result:
        m = result["matmul"]
        lines.append(f"matmul reference: {m['n']}x{m['n']} {m['dtype']} = {m['gflop_per_s']:.1f} GFLOP/s "
                     f"(median {m['median_ms']:.2f} ms)")
    if result.get("peak"):
        p = result["peak"]
        lines.append(f"peak for MFU / fraction of peak: {p['tflop_per_s']} TFLOP/s ({p['source']})")
    if "memory_budget" in result:
        b = result["memory_budget"]
        budget = "none" if b["bytes"] is None else format_bytes(b["bytes"])
        lines.append(f"memory budget: {budget} ({b['source']}; applies to {b.get('applies_to', 'temp memory')})")
    lines += ["", format_table(result["rows"], layout.columns)]
    if result.get("ratios"):
        lines += ["", f"{result['bench']} ratios: " + ", ".join(f"{k} = {v}x" for k, v in result["ratios"].items())]
    for label, entry in (result.get("summary") or {}).items():
        if "mfu_longest_over_shortest" in entry:
            lines.append(f"{label}: MFU at the longest T / at the shortest T = {entry['mfu_longest_over_shortest']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

def output_paths(out: str | os.PathLike) -> dict[str, pathlib.Path]:
    """FILE.json -> {"json": FILE.json, "csv": FILE.csv, "png": FILE.png}."""
    path = pathlib.Path(out)
    if path.suffix.lower() != ".json":
        raise UsageError(f"--out must name a .json file (the CSV and PNG are written next to it), got {str(out)!r}")
    return {"json": path, "csv": path.with_suffix(".csv"), "png": path.with_suffix(".png")}


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    # Write-then-rename: a sweep saving after every row must never leave a half-written file if killed.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory, so the rename is atomic
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> None:
    _atomic_write_text(pathlib.Path(path), json.dumps(result, indent=2, sort_keys=False) + "\n")


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows flattened for CSV: every row field, then the machine's fields prefixed `machine_`."""
    machine = {f"machine_{k}": v for k, v in result.get("machine", {}).items()}
    return [{**row, **machine} for row in result["rows"]]


def write_csv(path: str | os.PathLike, result: dict[str, Any]) -> None:
    rows = csv_rows(result)
    fields = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def write_plot(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """One panel per layout panel, y against the x field on a log-2 axis, one line per series value.

    Uses matplotlib's object API with the Agg canvas directly: no pyplot global state and no backend switch,
    so it works headless and does not disturb a caller's own matplotlib setup.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = _layout(result)
    rows = result[layout.plot_rows]
    series = list(dict.fromkeys(_series(r, layout) for r in rows))
    fig = Figure(figsize=(max(8, 6 * len(layout.panels)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(layout.panels), squeeze=False)[0]
    for ax, panel in zip(axes, layout.panels):
        for name in series:
            points = [(r[layout.x], r[panel.key]) for r in rows
                      if _series(r, layout) == name and _is_number(r.get(panel.key))]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=str(name))
        budget = ((result.get("memory_budget") or {}).get("bytes") or 0) / layout.budget_unit
        top = max([r[panel.key] for r in rows if _is_number(r.get(panel.key))], default=0)
        # The budget line only where it is in view: drawn orders of magnitude above tiny runs it flattens them.
        if panel.key == layout.budget_panel and top and budget and budget <= 10 * top:
            ax.axhline(budget, color="grey", linestyle="--", label="budget")
        ax.set_xscale("log", base=2)
        xs_all = sorted({r[layout.x] for r in rows})
        if len(xs_all) > 8:  # bisection probes: label the powers of two in range instead of every probe
            lo, hi = math.floor(math.log2(xs_all[0])), math.ceil(math.log2(xs_all[-1]))
            xs_all = [2 ** p for p in range(lo, hi + 1)]
        ax.set_xticks(xs_all, [str(x) for x in xs_all])  # plain lengths (1024, ...) read better than 2^10
        ax.minorticks_off()
        ys_all = [r[panel.key] for r in rows if _is_number(r.get(panel.key))]
        # A log axis over less than a decade only produces unreadable tick labels.
        if panel.log_y and ys_all and max(ys_all) >= 10 * min(ys_all):
            ax.set_yscale("log")
        ax.set_xlabel(layout.x_label)
        ax.set_ylabel(panel.label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"jaxctx bench {result['bench']}: {machine_summary(result['machine'])}", fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _series(row: dict[str, Any], layout: Layout) -> Any:
    """The row's series value (max-context results saved before `label` existed name the variant only)."""
    return row.get(layout.series, row.get("variant"))


def write_scaling_plot(path: str | os.PathLike, result: dict[str, Any]) -> bool:
    """max-context --sequence sweeps: max context per device budget against the devices one sequence spans,
    with the ideal (N x the N = 1 length). Returns False (and writes nothing) for other results."""
    # The blockwise rows, one per N, as `max_context.ratios` reads them: a plain run has a single one.
    rows = sorted((r for r in result.get("rows", [])
                   if r.get("variant") == "blockwise" and r.get("sequence") and r.get("max_seq_len")),
                  key=lambda r: r["sequence"])
    if result.get("bench") != "max-context" or len(rows) < 2 or rows[0]["sequence"] != 1:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ns = [r["sequence"] for r in rows]
    ax.plot(ns, [r["max_seq_len"] for r in rows], marker="o", label="blockwise + ring (measured)")
    ax.plot(ns, [rows[0]["max_seq_len"] * n for n in ns], linestyle="--", color="grey", label="ideal: N x (N = 1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("devices per sequence (parallel.sequence)")
    ax.set_ylabel(f"max context T at {result['budget']['gib']:g} GiB per device")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.suptitle(f"jaxctx bench max-context --sequence: {machine_summary(result['machine'])}", fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def save(result: dict[str, Any], out: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Write FILE.json, FILE.csv and FILE.png (and FILE-scaling.png for a --sequence sweep); return their paths."""
    paths = output_paths(out)
    write_json(paths["json"], result)
    write_csv(paths["csv"], result)
    write_plot(paths["png"], result)
    scaling = paths["png"].with_name(paths["png"].stem + "-scaling.png")
    if write_scaling_plot(scaling, result):
        paths = {**paths, "scaling_png": scaling}
    return paths
