"""Validation of task models during training: loss plus task metrics, and keeping the best checkpoint.

    evaluate_task(cfg, runner, state, data) -> {"val_loss", "accuracy", "macro_f1", ...} (+ "report": per class)
    BestKeeper(workdir, cfg) .update(step, result, runner, state, meta)   # train.keep_best: METRIC

One pass over the validation split in its fixed order, at most `train.eval_batches` batches; each example is
scored once (jaxctx.evaluate.task_metrics). Logits come from the model's `example_logits` (sequence tasks,
[B, E, N] at cls_index) or its call ([B, T, N], token tasks) on the global batch, so metrics need the whole batch
on this host: one process, no sequence (context) parallelism; otherwise only the loss is reported.

The best checkpoint lives in WORKDIR/best/ (one Orbax checkpoint, the same format as checkpoints/, so
`jaxctx predict --checkpoint WORKDIR/best` and `jaxctx convert to-hf WORKDIR/best` read it) with best.json naming
the step, metric and value. A resumed run reads best.json, so it only replaces a better checkpoint.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxctx.checkpoint import Checkpointer
from jaxctx.errors import ConfigError
from jaxctx.evaluate.predict import task_logits
from jaxctx.evaluate.task_metrics import CLASSIFICATION_KEYS, TAGGING_KEYS, TaskMetrics, headline

BEST_DIR = "best"
BEST_FILE = "best.json"
LOWER_IS_BETTER = ("val_loss", "mse")


def metric_names(cfg) -> tuple[str, ...]:
    """The metric names train.keep_best may name for this model."""
    if cfg.model.task == "token_classification":
        return ("val_loss",) + TAGGING_KEYS
    problem = cfg.model.problem
    extra = {"regression": ("mse",), "multi_label": ("micro_f1", "exact_match")}.get(problem, CLASSIFICATION_KEYS)
    return ("val_loss",) + extra


def check_keep_best(cfg) -> None:
    """Pre-flight: train.keep_best names a metric this run reports (ConfigError otherwise)."""
    metric = getattr(cfg.train, "keep_best", None)
    if not metric:
        return
    names = metric_names(cfg) if cfg.model.task != "lm" else ("val_loss",)
    if metric not in names:
        raise ConfigError(f"train.keep_best={metric!r} is not a metric of this run (model.task={cfg.model.task}); "
                          f"choose one of {', '.join(names)}")
    if cfg.data.validation_fraction == 0 and cfg.data.task is None:
        raise ConfigError("train.keep_best needs a validation split; set data.validation_fraction > 0")


def model_logits(runner, params, local_batch: dict) -> np.ndarray:
    """Logits of a single-host batch (numpy in, numpy out) with the runner's model and params."""
    with jax.set_mesh(runner.mesh):
        return np.asarray(jax.device_get(task_logits(runner.model, params, runner.put_batch(local_batch))))


def evaluate_task(cfg, runner, state, data, *, log=print) -> dict:
    """Validation loss and task metrics (see the module docstring)."""
    data.seek(0)
    batches = cfg.train.eval_batches  # every process runs the same number of (collective) eval steps
    if jax.process_count() == 1:  # one host: stop after one pass when the split is shorter
        batches = min(batches, -(-data.rows_per_epoch // data.local_batch))
    metrics_ok = jax.process_count() == 1 and cfg.parallel.sequence == 1 and cfg.parallel.mode != "pmap"
    acc = TaskMetrics(cfg.model.task, data.labels.names, cfg.model.problem)
    loss_sum = weight_sum = 0.0
    for _ in range(batches):
        local = next(data)
        batch = runner.put_batch(local)
        l_sum, w_sum = jax.device_get(runner.eval(state, batch))
        loss_sum, weight_sum = loss_sum + float(l_sum), weight_sum + float(w_sum)
        if metrics_ok:
            acc.add(local, model_logits(runner, state.params, local), data.last_examples)
    result = {"val_loss": loss_sum / max(weight_sum, 1.0)}
    if metrics_ok:
        full = acc.result()
        result.update(headline(full))
        result["report"] = {k: v for k, v in full.items() if isinstance(v, dict)}
    shown = "  ".join(f"{k} {v:.4f}" for k, v in headline(result).items() if k != "examples")
    covered = f"{result.get('examples', '?')} of {data.stats()['examples']} examples"
    if not metrics_ok:
        covered += "; task metrics need one process, no pmap or sequence parallelism"
    log(f"validation: {shown}  ({covered})")
    return result


def format_report(report: dict) -> str:
    """Per-class (or per-entity-type) precision / recall / F1 / support as a text table."""
    lines = []
    for title, table in report.items():
        lines.append(f"{title}: {'name':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        for name, row in table.items():
            lines.append(f"{'':<{len(title) + 2}}{name:<24} {row['precision']:>9.4f} {row['recall']:>9.4f} "
                         f"{row['f1']:>9.4f} {row['support']:>8d}")
    return "\n".join(lines)


class BestKeeper:
    """Saves the checkpoint with the best `train.keep_best` metric so far into WORKDIR/best/."""

    def __init__(self, workdir: str, metric: str | None):
        self.metric = metric
        self.directory = os.path.join(workdir, BEST_DIR)
        self.path = os.path.join(workdir, BEST_FILE)
        self.best = None
        if metric and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                record = json.load(f)
            if record.get("metric") == metric:
                self.best = record["value"]

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.metric in LOWER_IS_BETTER else value > self.best

    def update(self, step: int, result: dict, runner, state, meta: dict) -> bool:
        """Save `state` as the best if result[metric] improved; returns whether it did."""
        if not self.metric or self.metric not in result or not self.better(float(result[self.metric])):
            return False
        value = float(result[self.metric])
        ckpt = Checkpointer(self.directory, keep=1, async_save=False)
        try:
            runner.save(ckpt, step, state, meta)
            ckpt.wait()
        finally:
            ckpt.close()
        if jax.process_index() == 0:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"metric": self.metric, "value": value, "step": step}, f)
            os.replace(tmp, self.path)
        self.best = value
        return True
