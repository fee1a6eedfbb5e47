"""Fine-tuning end to end: eval_every task metrics in metrics.jsonl, keep_best, labels.json, and `jaxctx predict`
reproducing the logged metrics from the saved checkpoints."""

import json
import os

import jax
import pytest

from jaxctx import cli
from jaxctx import config as config_lib
from jaxctx.train import loop

# Tests here compile the same steps again and again: tests/conftest.py's persistent cache compiles each once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_task_run_logs_metrics_keeps_best_and_predict_agrees(tmp_path, capsys):
    data = str(tmp_path / "data")
    rows = [{"text": ch * (3 + i % 11) + " end", "label": {"a": "alpha", "b": "beta", "c": "gamma"}[ch]}
            for i in range(30) for ch in "abc"]
    _write(f"{data}/train.jsonl", rows[:72])
    _write(f"{data}/validation.jsonl", rows[72:])
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.yaml"), [
        "model.task=sequence_classification", "model.num_labels=3", "data.task=classification",
        f"data.source={data}", "data.seq_len=64", "data.num_proc=1", f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_documents=0", "train.steps=6", "train.eval_every=2", "train.eval_batches=8",
        "train.keep_best=accuracy", "train.batch_size=4", "train.checkpoint_every=3", "train.learning_rate=0.01"])
    workdir = str(tmp_path / "run")
    assert loop.run(cfg, workdir, devices=jax.devices()[:1]) == 0
    evals = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if "accuracy" in line]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["examples"] == 18 for r in evals)
    best = json.load(open(f"{workdir}/best.json"))
    top = max(r["accuracy"] for r in evals)
    assert best["metric"] == "accuracy" and best["value"] == top
    assert best["step"] == min(r["step"] for r in evals if r["accuracy"] == top)  # only a strict gain replaces it
    assert json.load(open(f"{workdir}/labels.json"))["names"] == ["alpha", "beta", "gamma"]
    assert "per_class" in capsys.readouterr().out  # the final report
    # predict reads the checkpoints from disk and encodes the file itself: the same numbers as the loop logged
    for ckpt, want in ((workdir, evals[-1]), (f"{workdir}/best", next(r for r in evals if r["step"] == best["step"]))):
        out = str(tmp_path / "preds.jsonl")
        assert cli.main(["predict", "--checkpoint", ckpt, "--data", f"{data}/validation.jsonl", "--out", out,
                         "--force"]) == 0
        preds = [json.loads(line) for line in open(out)]
        assert [p["index"] for p in preds] == list(range(18))
        assert [p["true_label"] for p in preds] == [r["label"] for r in rows[72:]]
        accuracy = sum(p["label"] == p["true_label"] for p in preds) / 18
        assert accuracy == pytest.approx(want["accuracy"])
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    # the export names the classes from the workdir's labels.json (the config had no model.id2label)
    hf_dir = str(tmp_path / "hf")
    assert cli.main(["convert", "to-hf", workdir, hf_dir]) == 0
    hf_config = json.load(open(f"{hf_dir}/config.json"))
    assert hf_config["id2label"] == {"0": "alpha", "1": "beta", "2": "gamma"}
    assert hf_config["label2id"] == {"alpha": 0, "beta": 1, "gamma": 2}


def test_tagging_run_and_predict_entities(tmp_path):
    from seqeval.metrics.sequence_labeling import get_entities

    data = str(tmp_path / "data")
    vocab = {"def": "B-kw", "return": "B-kw", "x": "B-name", "y": "B-name", "#": "B-comment", "note": "I-comment"}
    rows = []
    for i in range(40):
        words = [list(vocab)[(i * 3 + k) % 6] for k in range(3 + i % 5)]
        rows.append({"tokens": words, "tags": [vocab[w] for w in words]})
    _write(f"{data}/train.jsonl", rows[:30])
    _write(f"{data}/validation.jsonl", rows[30:])
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.yaml"), [
        "model.task=token_classification", "model.num_labels=4", "data.task=tagging", f"data.source={data}",
        "data.seq_len=64", "data.num_proc=1", f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=0",
        "train.steps=4", "train.batch_size=4", "train.checkpoint_every=4", "train.learning_rate=0.01"])
    workdir = str(tmp_path / "run")
    assert loop.run(cfg, workdir, devices=jax.devices()[:1]) == 0
    final = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl") if "entity_f1" in line][-1]
    out = str(tmp_path / "preds.jsonl")
    assert cli.main(["predict", "--checkpoint", workdir, "--data", f"{data}/validation.jsonl", "--out", out]) == 0
    preds = [json.loads(line) for line in open(out)]
    assert [p["tokens"] for p in preds] == [r["tokens"] for r in rows[30:]]
    assert all(len(p["tags"]) == len(p["tokens"]) for p in preds)
    for p in preds:
        assert [(e["type"], e["start"], e["end"] - 1) for e in p["entities"]] == get_entities(p["tags"])
        assert all(e["text"] == " ".join(p["tokens"][e["start"]:e["end"]]) for e in p["entities"])
    from jaxctx.evaluate.task_metrics import tagging_metrics
    again = tagging_metrics([r["tags"] for r in rows[30:]], [p["tags"] for p in preds])
    assert again["entity_f1"] == pytest.approx(final["entity_f1"])
    assert again["token_accuracy"] == pytest.approx(final["token_accuracy"])


def test_best_keeper_resumes_from_best_json(tmp_path):
    from jaxctx.train.task_eval import BEST_FILE, BestKeeper

    with open(tmp_path / BEST_FILE, "w") as f:
        json.dump({"metric": "accuracy", "value": 0.5, "step": 3}, f)
    keeper = BestKeeper(str(tmp_path), "accuracy")  # a resumed run only replaces a better checkpoint
    assert keeper.best == 0.5 and not keeper.better(0.5) and not keeper.better(0.4) and keeper.better(0.6)
    assert BestKeeper(str(tmp_path), "macro_f1").best is None  # another metric starts afresh
    loss = BestKeeper(str(tmp_path / "none"), "val_loss")
    loss.best = 1.0
    assert loss.better(0.9) and not loss.better(1.1)  # lower is better for the loss
    assert not BestKeeper(str(tmp_path), None).update(1, {"accuracy": 1.0}, None, None, {})  # off
