"""`jaxctx predict`: a fine-tuned task model's predictions for each example of a file, as JSONL.

    jaxctx predict --checkpoint WORKDIR[/best] --data FILE --out preds.jsonl [--batch-size 8] [--force]

FILE holds the columns the model was trained on (data.text_field [+ data.text_pair_field], or
data.tokens_field), in JSON/JSONL, CSV or parquet; the label column is optional. Examples are encoded and packed
exactly as in training (jaxctx.data.task, file order), so an example longer than data.seq_len is truncated (its
row says so). One output row per input example, in input order, written as batches finish:

    classification  {"index", "label", "probabilities": {name: p}, "truncated"} (+ "true_label" when FILE has it);
                    multi_label: "labels" (p > 0.5) and sigmoid probabilities; regression: "value"
    tagging         {"index", "tokens", "tags" (one per word), "scores" (the tag's probability, per word kept),
                     "entities": [{"type", "start", "end", "text"}], "truncated"} with entity spans over word
                    indices (end exclusive) from seqeval's BIO reader; words cut off by truncation are tagged "O"
                    and have no score

Label names come from model.id2label, else the workdir's labels.json (next to the checkpoint), else the ids.
If FILE has labels, the metrics of jaxctx.evaluate.task_metrics are printed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial

import jax
import numpy as np

from jaxctx.errors import UsageError

TASKS = ("sequence_classification", "token_classification")


@partial(jax.jit, static_argnums=0)
def task_logits(model, params, batch):
    """Logits of a task batch: [B, E, N] at cls_index (sequence tasks) or [B, T, N] (token tasks)."""
    kwargs = {k: batch[k] for k in ("segment_ids", "positions", "token_type_ids") if k in batch}
    if "cls_index" in batch:
        return model.apply({"params": params}, batch["input_ids"], batch["cls_index"], method="example_logits",
                           **kwargs)
    return model.apply({"params": params}, batch["input_ids"], **kwargs)


def find_labels(checkpoint: str, cfg):
    """The LabelSet of a task checkpoint: model.id2label, else a labels.json at or above it, else the ids."""
    from jaxctx.data.labels import LABELS_FILE, LabelSet, load_labels

    if cfg.model.id2label:
        return LabelSet(tuple(cfg.model.id2label), "names")
    path = os.path.abspath(checkpoint)
    for _ in range(3):  # WORKDIR, WORKDIR/best, WORKDIR/checkpoints[/N]
        if os.path.isfile(os.path.join(path, LABELS_FILE)):
            return load_labels(path)
        path = os.path.dirname(path)
    return LabelSet(tuple(str(i) for i in range(cfg.model.num_labels)), "ids")


def _with_placeholder_labels(ds, data_cfg, labels, task: str):
    """Add the label column with a placeholder when FILE has none (the encoder needs one; it is not used)."""
    field = data_cfg.tags_field if task == "token_classification" else data_cfg.label_field
    if field in ds.column_names:
        return ds, True
    first = labels.names[0] if labels.kind == "names" else 0
    if task == "token_classification":
        tokens = data_cfg.tokens_field
        return ds.map(lambda ex: {field: [first] * len(ex[tokens])}, desc="placeholder tags"), False
    return ds.add_column(field, [first] * len(ds)), False


def predict(checkpoint: str, data_file: str, out: str, *, batch_size: int = 8, force: bool = False,
            step: int | None = None, log=print) -> dict:
    """Write one prediction row per example of `data_file` to `out` (see the module docstring)."""
    from tqdm.auto import tqdm

    from jaxctx import models
    from jaxctx.data.sources import resolve_files
    from jaxctx.data.task import TaskIterator, _columns, check_columns, read_files
    from jaxctx.evaluate.task_metrics import TaskMetrics, headline
    from jaxctx.generate import loading

    if os.path.exists(out) and not force:
        raise UsageError(f"--out {out} exists; pass --force to replace it")
    model_info = loading.load(checkpoint, step=step, command="jaxctx predict", tasks=TASKS)
    cfg = model_info.cfg
    task = cfg.model.task
    data_cfg = dataclasses.replace(cfg.data, task="tagging" if task == "token_classification" else "classification",
                                   shuffle=False, max_documents=0, streaming=False)
    cfg = dataclasses.replace(cfg, data=data_cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
    labels = find_labels(checkpoint, cfg)
    description = data_file
    inputs = _columns(data_cfg)[:-1]  # everything but the label / tags column
    ds = read_files(data_cfg, resolve_files(data_file), description, inputs)
    check_columns(data_cfg, ds, inputs, description)
    ds, has_labels = _with_placeholder_labels(ds, data_cfg, labels, task)
    ds = ds.select_columns(_columns(data_cfg))
    it = TaskIterator(cfg, "validation", repeat=False, examples=(ds, description), labels=labels)
    model = models.build(cfg)
    params = jax.device_put(model_info.params)
    metrics = TaskMetrics(task, labels.names, cfg.model.problem) if has_labels else None
    names = list(labels.names)
    tmp = out + ".tmp"
    written = 0
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=len(ds), desc="predict", unit="example") as bar:
        for batch in it:
            logits = np.asarray(jax.device_get(task_logits(model, params, batch)), np.float32)
            if metrics is not None:
                metrics.add(batch, logits, it.last_examples)
            for row in _rows(batch, logits, it, names, cfg, ds, data_cfg, has_labels):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            bar.update(int((it.last_examples >= 0).sum()))
    os.replace(tmp, out)
    summary = {"examples": written, "out": out, "truncated": int(it.store.truncated.sum())}
    if metrics is not None:
        summary.update(headline(metrics.result()))
    log(f"wrote {written} predictions to {out} ({summary['truncated']} examples truncated to data.seq_len="
        f"{cfg.data.seq_len})" + ("; " + "  ".join(f"{k} {v:.4f}" for k, v in headline(summary).items()
                                                  if k not in ("examples", "truncated")) if metrics else ""))
    return summary


def _rows(batch, logits, it, names, cfg, ds, data_cfg, has_labels):
    """Prediction rows of one batch, in example order."""
    from seqeval.metrics.sequence_labeling import get_entities

    slots = [(int(it.last_examples[r, k]), r, k) for r, k in zip(*np.nonzero(it.last_examples >= 0))]
    problem = cfg.model.problem
    for index, r, k in sorted(slots):
        row = {"index": index, "truncated": bool(it.store.truncated[index])}
        if cfg.model.task == "sequence_classification":
            z = logits[r, k]
            if problem == "regression":
                row["value"] = float(z[0])
            elif problem == "multi_label":
                p = 1 / (1 + np.exp(-z))
                row["labels"] = [names[i] for i in np.nonzero(p > 0.5)[0]]
                row["probabilities"] = {n: round(float(v), 6) for n, v in zip(names, p)}
            else:
                p = np.exp(z - z.max())
                p /= p.sum()
                row["label"] = names[int(p.argmax())]
                row["probabilities"] = {n: round(float(v), 6) for n, v in zip(names, p)}
            if has_labels:
                row["true_label"] = ds[index][data_cfg.label_field]
        else:
            words = ds[index][data_cfg.tokens_field]
            scored = (batch["segment_ids"][r] == k + 1) & (batch["loss_mask"][r] > 0)
            z = logits[r][scored]  # [words kept, N]: each word's first sub-token
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            tags = [names[i] for i in z.argmax(-1)]
            scores = [round(float(v), 6) for v in p.max(-1)]
            tags += ["O"] * (len(words) - len(tags))  # words cut off by truncation (no score)
            row["tokens"], row["tags"], row["scores"] = words, tags, scores
            row["entities"] = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s:e + 1])}
                               for t, s, e in get_entities(tags)]
        yield row
