"""`jaxctx bench finetune-context`: task accuracy against context length, same model and steps at every length.

For each `data.seq_len` the same fine-tuning experiment (the base config, default
configs/finetune-stdlib-package.yaml) is trained from scratch with identical architecture, init seed, optimizer,
number of steps and examples per step; only the context each example gets differs:
- `model.max_positions` is the largest seq_len of the sweep at every length, so the parameter shapes (and the
  init, from train.seed) are the same everywhere; shorter rows just use a prefix of the position table;
- `data.max_examples_per_row: 1`, so a row holds exactly one file (truncated to seq_len) and a batch of
  train.batch_size rows is always train.batch_size examples: a 4096-token row is not filled with extra files.
After training, the final checkpoint predicts every validation example (`jaxctx.evaluate.predict`, the same
path as `jaxctx predict`); accuracy and macro-F1 come from those predictions (`classification_metrics`), and
the predictions file is kept beside the results so the figures can be recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import time
from typing import Any

from jaxctx.bench.machine import machine_info
from jaxctx.bench.report import _atomic_write_text, output_paths, write_json
from jaxctx.errors import UsageError

DEFAULT_CONFIG = "configs/finetune-stdlib-package.yaml"
CSV_COLUMNS = ("seq_len", "accuracy", "macro_f1", "examples", "truncated_validation_examples", "steps",
               "batch_size", "train_s", "predict_s", "loop_val_accuracy")


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `jaxctx predict` JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_from_predictions(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Accuracy / macro-F1 / per-class from predicted vs true label names (rows of `jaxctx predict`)."""
    from jaxctx.evaluate.task_metrics import classification_metrics

    index = {n: i for i, n in enumerate(names)}
    y_true = [index[r["true_label"]] for r in rows]
    y_pred = [index[r["label"]] for r in rows]
    return classification_metrics(y_true, y_pred, names)


def _last_validation(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The training loop's own last validation row of metrics.jsonl (a cross-check; it may see fewer rows)."""
    last = None
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "accuracy" in row:
                last = row
    return last


def run_one(seq_len: int, *, config: str, data_dir: str, workdir: pathlib.Path, max_positions: int, steps: int,
            batch_size: int, warmup_steps: int, overrides: list[str], log=print) -> dict[str, Any]:
    """Train one seq_len from scratch, predict the validation split, and return its result row."""
    from jaxctx.evaluate.predict import predict
    from jaxctx.train.cli import main as train_main

    sets = [f"data.source={data_dir}", f"data.seq_len={seq_len}", f"model.max_positions={max_positions}",
            "data.max_examples_per_row=1", "train.init_from=null", "train.keep_best=null",
            f"train.steps={steps}", f"train.batch_size={batch_size}", f"train.warmup_steps={warmup_steps}",
            f"train.checkpoint_every={steps}", "train.eval_every=0", "train.eval_batches=1",
            f"train.log_every={max(1, steps // 5)}", *overrides]
    argv = ["--config", config, "--workdir", str(workdir)]
    for s in sets:
        argv += ["--set", s]
    log(f"finetune-context: seq_len {seq_len}: training {steps} steps x {batch_size} examples")
    t0 = time.perf_counter()
    rc = train_main(argv)
    train_s = time.perf_counter() - t0
    if rc:
        raise UsageError(f"finetune-context: training at seq_len {seq_len} failed (exit {rc}); see {workdir}")
    preds = workdir / "validation-predictions.jsonl"
    t0 = time.perf_counter()
    predict(str(workdir), str(pathlib.Path(data_dir) / "validation.jsonl"), str(preds), batch_size=batch_size,
            force=True, log=log)
    predict_s = time.perf_counter() - t0
    names = json.loads((workdir / "labels.json").read_text(encoding="utf-8"))
    names = names["names"] if isinstance(names, dict) else names  # jaxctx.data.labels writes {"names": [...]}
    rows = read_predictions(preds)
    m = metrics_from_predictions(rows, names)
    loop_val = _last_validation(workdir)
    return {"seq_len": seq_len, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "examples": m["examples"],
            "truncated_validation_examples": sum(bool(r["truncated"]) for r in rows), "steps": steps,
            "batch_size": batch_size, "train_s": round(train_s, 1), "predict_s": round(predict_s, 1),
            "loop_val_accuracy": None if loop_val is None else loop_val["accuracy"],
            "per_class": m["per_class"], "predictions": str(preds)}


def run(seq_lens: list[int], *, config: str, data_dir: str, workdir_root: str, steps: int, batch_size: int,
        warmup_steps: int, overrides: list[str], out: str | None, log=print) -> dict[str, Any]:
    """The whole sweep; saves JSON/CSV/PNG after every row when `out` is given."""
    if not seq_lens or any(t <= 0 for t in seq_lens):
        raise UsageError(f"--seq-lens needs positive lengths, got {seq_lens}")
    if not (pathlib.Path(data_dir) / "validation.jsonl").is_file():
        raise UsageError(f"--data {data_dir}: no validation.jsonl there; make it with "
                         f"`jaxctx data make-task stdlib-package --out {data_dir}`")
    root = pathlib.Path(workdir_root)
    result: dict[str, Any] = {
        "bench": "finetune-context", "config": config, "data": data_dir, "steps": steps, "batch_size": batch_size,
        "warmup_steps": warmup_steps, "max_positions": max(seq_lens), "overrides": overrides,
        "model_note": "trained from scratch at every length (same init seed and shapes; max_positions = the "
                      "largest seq_len); one example per row", "machine": machine_info(), "rows": []}
    for t in seq_lens:
        wd = root / f"seq{t}"
        if wd.exists() and any(wd.iterdir()):
            raise UsageError(f"--workdir-root {root}: {wd} already holds a run; choose an empty directory")
        row = run_one(t, config=config, data_dir=data_dir, workdir=wd, max_positions=max(seq_lens), steps=steps,
                      batch_size=batch_size, warmup_steps=warmup_steps, overrides=overrides, log=log)
        result["rows"].append(row)
        log(f"finetune-context: seq_len {t}: accuracy {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f} "
            f"({row['examples']} files, {row['truncated_validation_examples']} truncated) train {row['train_s']} s")
        if out:
            save(result, out)
    return result


def save(result: dict[str, Any], out: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Write FILE.json, FILE.csv and FILE.png (accuracy and macro-F1 against seq_len)."""
    paths = output_paths(out)
    write_json(paths["json"], result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result["rows"])
    _atomic_write_text(paths["csv"], buf.getvalue())
    _write_plot(paths["png"], result)
    return paths


def _write_plot(path: pathlib.Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r["accuracy"] for r in rows], "o-", label="accuracy")
    ax.plot(xs, [r["macro_f1"] for r in rows], "s--", label="macro-F1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("data.seq_len (bytes of each file seen)")
    ax.set_ylabel("validation score")
    ax.set_ylim(0, 1)
    ax.set_title(f"stdlib-package, {result['steps']} steps x {result['batch_size']} files, same model")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
