"""Task metrics: classification (accuracy, macro-F1, per-class P/R/F1) and tagging (seqeval entity P/R/F1).

    classification_metrics(y_true, y_pred, names)  -> {"accuracy", "macro_f1", "per_class": {name: {p, r, f1,
                                                       support}}}
    tagging_metrics(true_tags, pred_tags)          -> {"entity_precision", "entity_recall", "entity_f1",
                                                       "token_accuracy", "per_type": {...}}
    TaskMetrics(task, names)                        accumulates batches of logits (numpy) during an eval pass

Macro-F1 averages the per-class F1 over the classes present in the true or predicted labels (as
scikit-learn's `f1_score(average="macro")` does with its default labels); a class with no predictions has
precision 0. Entity-level scores come from the `seqeval` library (CoNLL rules: a span counts only if its type
and both ends match); token accuracy is over the scored tokens (the first sub-token of each word).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Metric names a run can keep the best checkpoint by (train.keep_best), larger is better except the loss.
CLASSIFICATION_KEYS = ("accuracy", "macro_f1")
TAGGING_KEYS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")


def _prf(tp: float, n_pred: float, n_true: float) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support for single-label class ids."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    per_class, f1s = {}, []
    for c in sorted(set(y_true.tolist()) | set(y_pred.tolist())):
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        p, r, f1 = _prf(tp, float(np.sum(y_pred == c)), float(np.sum(y_true == c)))
        name = names[c] if 0 <= c < len(names) else str(c)
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": int(np.sum(y_true == c))}
        f1s.append(f1)
    return {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0, "per_class": per_class, "examples": int(len(y_true))}


def tagging_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision/recall/F1 (seqeval, micro over entities), per type, and token accuracy."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    true_tags, pred_tags = [list(t) for t in true_tags], [list(p) for p in pred_tags]
    words = sum(len(t) for t in true_tags)
    correct = sum(a == b for t, p in zip(true_tags, pred_tags) for a, b in zip(t, p))
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {name: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                       "f1": float(v["f1-score"]), "support": int(v["support"])}
                for name, v in report.items() if not name.endswith(" avg")}
    return {"entity_precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "entity_recall": float(recall_score(true_tags, pred_tags, zero_division=0)),
            "entity_f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
            "token_accuracy": correct / words if words else 0.0, "per_type": per_type, "examples": len(true_tags)}


class TaskMetrics:
    """Accumulates one eval pass of a task model: `add(batch, logits, examples)` then `result()`.

    classification: logits [B, E, N] at the batch's label slots (label_mask 1 = real); tagging: logits [B, T, N]
    with the batch's `examples` [B, E] (example index per slot, -1 empty) to cut rows back into examples.
    Multi-label and regression report their own numbers (micro F1 of the thresholded labels / mean squared
    error); single-label and tagging the metrics above.
    """

    def __init__(self, task: str, names: Sequence[str], problem: str | None = None):
        self.task, self.names, self.problem = task, list(names), problem
        self.true: list = []
        self.pred: list = []
        self.seen: set[int] = set()  # examples already counted (a repeating iterator may wrap around)

    def add(self, batch: dict, logits: np.ndarray, examples: np.ndarray) -> None:
        logits = np.asarray(logits, np.float32)
        if self.task == "sequence_classification":
            for r, k in zip(*np.nonzero(batch["label_mask"] > 0)):
                if self._new(examples[r, k]):
                    self.true.append(batch["labels"][r, k])
                    self.pred.append(logits[r, k])
            return
        seg, labels, mask = batch["segment_ids"], batch["labels"], batch["loss_mask"]
        best = logits.argmax(-1)  # [B, T]
        for r, k in zip(*np.nonzero(examples >= 0)):
            if not self._new(examples[r, k]):
                continue
            scored = (seg[r] == k + 1) & (mask[r] > 0)  # the labelled first sub-tokens of this example
            self.true.append([self.names[i] for i in labels[r][scored]])
            self.pred.append([self.names[i] for i in best[r][scored]])

    def _new(self, example) -> bool:
        example = int(example)
        if example in self.seen:
            return False
        self.seen.add(example)
        return True

    def result(self) -> dict:
        if self.task == "token_classification":
            return tagging_metrics(self.true, self.pred)
        true, logits = np.asarray(self.true), np.asarray(self.pred)
        if self.problem == "regression":
            return {"mse": float(np.mean((logits[..., 0] - true) ** 2)) if len(true) else 0.0,
                    "examples": len(true)}
        if self.problem == "multi_label":
            hit, want = logits > 0, true > 0.5
            p, r, f1 = _prf(float(np.sum(hit & want)), float(hit.sum()), float(want.sum()))
            return {"micro_f1": f1, "precision": p, "recall": r, "exact_match": float(np.mean(np.all(
                hit == want, axis=-1))) if len(true) else 0.0, "examples": len(true)}
        return classification_metrics(true, logits.argmax(-1) if len(logits) else [], self.names)


def headline(metrics: dict) -> dict:
    """The scalar numbers of a metrics dict (what metrics.jsonl and the console get; per-class tables dropped)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
