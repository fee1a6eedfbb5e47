"""The evaluation pictures: loss against context position, passkey accuracy heat map (matplotlib, Agg, atomic)."""

from __future__ import annotations

import os
import pathlib


def _save(fig, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        FigureCanvasAgg(fig).print_png(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_position_loss(path: str | os.PathLike, curves: dict[str, list[dict]], title: str) -> None:
    """Mean loss per context bucket (x: bucket end on a log-2 axis), one line per named curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, rows in curves.items():
        rows = [r for r in rows if r["mean_loss"] is not None]
        ax.plot([r["context_to"] for r in rows], [r["mean_loss"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens before the target)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_passkey(path: str | os.PathLike, table: list[dict], title: str) -> None:
    """Accuracy heat map: prompt length (columns) x needle depth (rows), each cell labelled."""
    from matplotlib.figure import Figure

    lengths = sorted({r["length"] for r in table})
    depths = sorted({r["depth"] for r in table})
    grid = [[next(r["accuracy"] for r in table if r["length"] == n and r["depth"] == d) for n in lengths]
            for d in depths]
    fig = Figure(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2.0))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
