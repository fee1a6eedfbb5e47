"""Task models and BertForPreTraining vs transformers, both ways: logits parity, no missing/unexpected keys, bit-exact
tensors on the round trip, label names / problem_type through config.json."""

import json
import os

import numpy as np
import pytest

from jaxctx.convert import from_hf, to_hf
from jaxctx.convert.errors import TensorMismatchError, UnsupportedModelError

N = 3
LABELS = {0: "neg", 1: "neutral", 2: "pos"}
CLASSES = {("bert", "sequence_classification"): "BertForSequenceClassification",
           ("bert", "token_classification"): "BertForTokenClassification",
           ("gpt2", "sequence_classification"): "GPT2ForSequenceClassification",
           ("gpt2", "token_classification"): "GPT2ForTokenClassification",
           ("llama", "sequence_classification"): "LlamaForSequenceClassification",
           ("llama", "token_classification"): "LlamaForTokenClassification"}
PAD = 0


def hf_task_model(hf, family, task, **overrides):
    """A random transformers task model (eval mode, f32), every parameter perturbed."""
    import torch
    import transformers as T

    config_cls = {"gpt2": T.GPT2Config, "bert": T.BertConfig, "llama": T.LlamaConfig}[family]
    kwargs = {**hf.CONFIGS[family], "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()},
              "pad_token_id": PAD, **overrides}
    torch.manual_seed(1)
    model = getattr(T, CLASSES[family, task])(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def padded_batch(hf, family):
    """ids [2, 17] (no pad id inside the text), right padding on row 0, token types for bert."""
    ids = np.random.default_rng(5).integers(1, hf.VOCAB, (2, 17)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 11:] = 0
    ids[mask == 0] = PAD
    extra = {"token_type_ids": (np.arange(17)[None] >= 8).astype(np.int32).repeat(2, 0)} if family == "bert" else {}
    return ids, mask, extra


def load_task(path, family, task):
    import torch
    import transformers as T

    auto = T.AutoModelForSequenceClassification if task == "sequence_classification" else \
        T.AutoModelForTokenClassification
    model, info = auto.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    assert not {k: v for k, v in info.items() if v}, info
    assert type(model).__name__ == CLASSES[family, task]
    return model.eval()


@pytest.mark.parametrize("family,task", sorted(CLASSES))
def test_task_model_both_ways(hf, tmp_path, family, task):
    model = hf_task_model(hf, family, task)
    src = hf.save(model, tmp_path / "hf")
    cfg, params = from_hf(src)
    m = cfg.model
    assert (m.task, m.num_labels, m.id2label) == (task, N, ("neg", "neutral", "pos"))

    ids, mask, extra = padded_batch(hf, family)
    ref = hf.logits(model, ids, attention_mask=mask, **extra)
    ours = hf.ours(cfg, params, ids, segment_ids=mask, **extra)
    if task == "token_classification":  # padding positions are not compared (HF attends nowhere there)
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    err = np.abs(ours - ref).max()
    print(f"{CLASSES[family, task]} import: max |logits - transformers| = {err:.2e}")
    assert ours.shape[-1] == N and err < hf.TOL, err

    to_hf(cfg, params, tmp_path / "out")
    hf.assert_same_tensors(hf.tensors(src), hf.tensors(tmp_path / "out"))  # no key lost or added, bit exact
    back = load_task(tmp_path / "out", family, task)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert config["label2id"] == {v: k for k, v in LABELS.items()}
    assert back.config.num_labels == N
    if task == "sequence_classification":
        assert config["problem_type"] == "single_label_classification"
    err = np.abs(hf.logits(back, ids, attention_mask=mask, **extra) - hf.logits(model, ids, attention_mask=mask,
                                                                                   **extra)).max()
    assert err == 0.0, err


def test_problem_type_and_native_export(hf, tmp_path):
    """A jaxctx-born regression model exports as HF's regression problem and loads with LABEL_0."""
    from jaxctx import config as config_lib

    cfg = config_lib.from_dict({"model": {"family": "gpt2", "num_layers": 3, "num_heads": 6, "d_model": 48,
                                          "vocab_size": 101, "max_positions": 64, "task": "sequence_classification",
                                          "num_labels": 1}, "data": {"seq_len": 64}}).resolved()
    assert cfg.model.problem == "regression"
    params = hf.jaxctx_params(cfg)
    to_hf(cfg, params, tmp_path / "out")
    back = load_task(tmp_path / "out", "gpt2", "sequence_classification")
    assert (back.config.problem_type, back.config.id2label) == ("regression", {0: "LABEL_0"})
    ids = np.random.default_rng(2).integers(1, 101, (2, 9)).astype(np.int32)
    err = np.abs(hf.ours(cfg, params, ids) - hf.logits(back, ids)).max()
    assert err < hf.TOL, err
    cfg2, _ = from_hf(str(tmp_path / "out"))
    assert (cfg2.model.problem_type, cfg2.model.num_labels) == ("regression", 1)


def test_bert_for_pretraining_keeps_pooler_and_nsp_head(hf, tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(2)
    model = T.BertForPreTraining(T.BertConfig(**hf.CONFIGS["bert"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = hf.save(model, tmp_path / "hf")
    cfg, params = from_hf(src)
    assert cfg.model.nsp_head and cfg.model.task == "lm"
    assert params["pooler"]["kernel"].shape == (48, 48) and params["nsp_head"]["kernel"].shape == (48, 2)
    ids, mask, extra = padded_batch(hf, "bert")
    with torch.no_grad():
        out = model(torch.as_tensor(ids), token_type_ids=torch.as_tensor(extra["token_type_ids"]))
    from jaxctx.models import build
    ours_nsp = build(cfg).apply({"params": params}, ids, token_type_ids=extra["token_type_ids"], method="nsp_logits")
    ours_mlm = hf.ours(cfg, params, ids, token_type_ids=extra["token_type_ids"])
    nsp_err = np.abs(np.asarray(ours_nsp) - out.seq_relationship_logits.numpy()).max()
    mlm_err = np.abs(ours_mlm - out.prediction_logits.numpy()).max()
    print(f"BertForPreTraining import: max |logits - transformers| = {mlm_err:.2e} (MLM), {nsp_err:.2e} (NSP)")
    assert nsp_err < hf.TOL and mlm_err < hf.TOL, (nsp_err, mlm_err)

    to_hf(cfg, params, tmp_path / "out")
    hf.assert_same_tensors(hf.tensors(src), hf.tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    back, info = T.BertForPreTraining.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info


def test_task_checkpoint_label_mismatches_are_refused(hf, tmp_path):
    model = hf_task_model(hf, "gpt2", "sequence_classification")
    src = hf.save(model, tmp_path / "hf")
    config_path = os.path.join(src, "config.json")
    config = json.loads(open(config_path).read())
    config["id2label"] = {"0": "a", "1": "b"}  # two names, but score.weight has three rows
    config.pop("label2id")
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(TensorMismatchError, match=r"score.weight is \[3, 48\], expected \[2, 48\]"):
        from_hf(src)
    config["num_labels"] = 5
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="num_labels=5 but id2label names 2 labels"):
        from_hf(src)
