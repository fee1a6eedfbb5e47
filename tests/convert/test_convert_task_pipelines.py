"""Exported task models in transformers' own pipelines: `pipeline("text-classification")` and
`pipeline("token-classification")` on `jaxctx convert to-hf` output give the labels and scores `jaxctx predict`
gives on the checkpoint. The export's tokenizer.json must add the special tokens fine-tuning added ([CLS] ... [SEP]
for bert, a final EOS for gpt2/llama sequence heads), or the pipeline feeds the model different ids.

Models are random (a head scaled up so the classes are far from tied), saved as checkpoints; the byte tokenizer and
a BPE from `jaxctx tokenizer train` (copied into the export) are both covered.
"""

import json
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.checkpoint import save_params
from jaxctx.cli import main

TEXTS = ["def main():\n    return 0", "class Point: pass", "import os, sys", "x = [1, 2, 3]  # three"]
PAIRS = ["first half", "the other part of it", "z", "y"]  # not "": transformers drops an empty pair
SEQ_LABELS = ["neg", "neutral", "pos"]
TAG_LABELS = ["O", "B-kw", "I-kw"]
WORDS = [["def", "f", "(", "x", ")", ":"], ["return", "x", "+", "1"], ["import", "os"]]


def _checkpoint(hf, path, family, task, tokenizer="byte", extra=()):
    """A random task model saved as a jaxctx checkpoint (params + config), its head scaled x40."""
    labels = SEQ_LABELS if task == "sequence_classification" else TAG_LABELS
    cfg = config_lib.load(None, [f"model.family={family}", "model.num_layers=2", "model.d_model=48",
                                 "model.num_heads=6", *(["model.num_kv_heads=2"] if family == "llama" else []),
                                 "data.seq_len=64", f"model.task={task}", f"model.num_labels={len(labels)}",
                                 f"model.id2label=[{','.join(labels)}]", f"data.tokenizer={tokenizer}", *extra])
    params = hf.jaxctx_params(cfg)
    params["classifier"] = {k: v * 40 for k, v in params["classifier"].items()}
    save_params(str(path), params, {"config": cfg.to_dict(), "step": 0})
    return str(path)


def _predict(tmp_path, ckpt, rows):
    data, out = tmp_path / "in.jsonl", tmp_path / "preds.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", "--checkpoint", ckpt, "--data", str(data), "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _export(ckpt, out):
    assert main(["convert", "to-hf", ckpt, str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bpe") / "tok")
    assert main(["tokenizer", "train", "--data", "stdlib", "--vocab-size", "300", "--max-documents", "20",
                 "--out", out]) == 0
    return out


@pytest.mark.parametrize("family, pairs, tokenizer", [("bert", True, "byte"), ("gpt2", False, "byte"),
                                                      ("gpt2", True, "byte"), ("llama", False, "bpe")])
def test_text_classification_pipeline_equals_predict(hf, tmp_path, bpe_dir, family, pairs, tokenizer):
    from transformers import pipeline

    ckpt = _checkpoint(hf, tmp_path / "ckpt", family, "sequence_classification",
                       bpe_dir if tokenizer == "bpe" else "byte", ["data.text_pair_field=text_pair"] if pairs else [])
    rows = [{"text": t, **({"text_pair": p} if pairs else {})} for t, p in zip(TEXTS, PAIRS)]
    ours = _predict(tmp_path, ckpt, rows)
    pipe = pipeline("text-classification", model=_export(ckpt, tmp_path / "hf"), top_k=None)
    for row, mine in zip(rows, ours):
        theirs = pipe({"text": row["text"], "text_pair": row["text_pair"]} if pairs else row["text"])
        theirs = theirs[0] if isinstance(theirs[0], list) else theirs  # a str input gives [[...]] with top_k=None
        assert theirs[0]["label"] == mine["label"]
        got = {r["label"]: r["score"] for r in theirs}
        assert set(got) == set(SEQ_LABELS)
        np.testing.assert_allclose([got[n] for n in SEQ_LABELS], [mine["probabilities"][n] for n in SEQ_LABELS],
                                   atol=1e-5)
    # the scores really differ between classes: equal labels are not a tie broken the same way by chance
    assert max(max(p["probabilities"].values()) - min(p["probabilities"].values()) for p in ours) > 0.2


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_token_classification_pipeline_equals_predict(hf, tmp_path, family):
    from transformers import pipeline

    ckpt = _checkpoint(hf, tmp_path / "ckpt", family, "token_classification")
    ours = _predict(tmp_path, ckpt, [{"tokens": w} for w in WORDS])
    pipe = pipeline("token-classification", model=_export(ckpt, tmp_path / "hf"))  # aggregation "none": per token
    tagged = 0
    for words, mine in zip(WORDS, ours):
        theirs = {e["start"]: e for e in pipe(" ".join(words))}  # byte tokens, "O" left out
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])  # each word's first byte
        for start, tag, score in zip(starts, mine["tags"], mine["scores"]):
            if tag == "O":
                assert int(start) not in theirs
            else:
                tagged += 1
                assert theirs[int(start)]["entity"] == tag
                assert theirs[int(start)]["score"] == pytest.approx(score, abs=1e-5)
    assert tagged > 0  # some words carry a non-O tag, so the comparison above is not vacuous
