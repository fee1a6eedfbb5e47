"""`jaxctx bench finetune-context` end to end on a tiny setting: one trained run per seq_len, JSON/CSV/PNG written,
and the reported accuracy / macro-F1 recomputed independently from the kept predictions files."""

import csv
import json
import os

import pytest

from jaxctx import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.slow  # two tiny trainings + predictions: ~40 s on an idle 2-core machine, 95 s loaded
def test_finetune_context_sweep_writes_files_and_reports_the_predictions_accuracy(tmp_path):
    data = str(tmp_path / "data")
    # the label is only visible after byte 40: the 32-byte row cannot see it, the 64-byte row can
    rows = [{"text": "x" * 40 + ch * (5 + i % 7), "label": {"a": "alpha", "b": "beta", "c": "gamma"}[ch]}
            for i in range(8) for ch in "abc"]
    _write(f"{data}/train.jsonl", rows[:16])
    _write(f"{data}/validation.jsonl", rows[16:])
    out = tmp_path / "res" / "r.json"
    argv = ["bench", "finetune-context", "--config", os.path.join(ROOT, "configs", "finetune-stdlib-package.yaml"),
            "--data", data, "--seq-lens", "32,64", "--steps", "2", "--batch-size", "8", "--warmup-steps", "1",
            "--workdir-root", str(tmp_path / "runs"), "--out", str(out)]
    for s in ("model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_labels=3",
              "data.num_proc=1", f"data.cache_dir={tmp_path / 'cache'}"):
        argv += ["--set", s]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["seq_len"] for r in result["rows"]] == [32, 64] and result["max_positions"] == 64
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["seq_len"]) for r in table] == [32, 64]
    for row, line in zip(result["rows"], table):
        preds = [json.loads(x) for x in open(row["predictions"])]
        assert len(preds) == row["examples"] == 8
        hits = [p["label"] == p["true_label"] for p in preds]
        assert row["accuracy"] == sum(hits) / len(hits) == float(line["accuracy"])
        f1s = []  # macro-F1 over the classes that occur as truth or prediction
        for c in {p["true_label"] for p in preds} | {p["label"] for p in preds}:
            tp = sum(p["label"] == c == p["true_label"] for p in preds)
            n_pred, n_true = sum(p["label"] == c for p in preds), sum(p["true_label"] == c for p in preds)
            f1s.append(2 * tp / (n_pred + n_true) if tp else 0.0)
        assert abs(row["macro_f1"] - sum(f1s) / len(f1s)) < 1e-12
        # the 32-byte rows cut every validation text (40+ bytes); the 64-byte rows cut none
        assert row["truncated_validation_examples"] == (8 if row["seq_len"] == 32 else 0)
        assert row["steps"] == 2 and row["batch_size"] == 8
