"""BERT: parity with transformers' BertForMaskedLM both ways (token types, padding), bit-exact round trip, and
BertForPreTraining / TF-era checkpoints."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxctx import config as config_lib
from jaxctx.convert import from_hf, to_hf


def test_import_matches_transformers(hf, saved):
    model, path = saved("bert")
    cfg, params = from_hf(path)
    m = cfg.model
    assert (m.family, m.num_layers, m.num_heads, m.dim_per_head, m.ff_dim, m.type_vocab_size, m.max_positions) == \
        ("bert", 3, 6, 8, 80, 3, 64)
    rng = np.random.default_rng(0)
    for ids in (hf.ids((2, 17), seed=1), hf.ids((1, 64), seed=2)):
        types = rng.integers(0, 3, ids.shape).astype(np.int32)
        err = np.abs(hf.ours(cfg, params, ids, token_type_ids=types) -
                     hf.logits(model, ids, token_type_ids=types)).max()
        print(f"bert import: max |logits - transformers| = {err:.2e}")
        assert err < hf.TOL, err
    # Padding: HF masks pad keys with attention_mask; we put padding in a segment of its own. Real tokens agree.
    ids = hf.ids((2, 17), seed=3)
    types = np.zeros_like(ids)
    types[:, 9:] = 1
    mask = np.ones_like(ids)
    mask[0, 12:] = 0
    ours = hf.ours(cfg, params, ids, segment_ids=mask, token_type_ids=types)
    ref = hf.logits(model, ids, attention_mask=mask, token_type_ids=types)
    assert np.abs((ours - ref)[mask.astype(bool)]).max() < hf.TOL


def test_export_of_jaxctx_model_loads_and_matches(hf, tmp_path):
    cfg = config_lib.from_dict({"model": {"family": "bert", "num_layers": 3, "num_heads": 6, "d_model": 48,
                                          "d_ff": 80, "vocab_size": 101, "type_vocab_size": 3,
                                          "max_positions": 64}, "data": {"seq_len": 64}}).resolved()
    params = hf.jaxctx_params(cfg)
    to_hf(cfg, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["architectures"] == ["BertForMaskedLM"]
    model = hf.load(tmp_path / "out", "bert")
    ids = hf.ids((2, 17), seed=4)
    types = np.random.default_rng(1).integers(0, 3, ids.shape).astype(np.int32)
    err = np.abs(hf.ours(cfg, params, ids, token_type_ids=types) - hf.logits(model, ids, token_type_ids=types)).max()
    print(f"bert export: max |logits - transformers| = {err:.2e}")
    assert err < hf.TOL, err


def test_import_export_is_bit_exact(hf, saved, tmp_path):
    _, path = saved("bert")
    cfg, params = from_hf(path)
    to_hf(cfg, params, tmp_path / "out")
    hf.assert_same_tensors(hf.tensors(path), hf.tensors(tmp_path / "out"))


def test_pretraining_checkpoint_with_tf_names(hf, saved, tmp_path):
    """BertForPreTraining-style files: LayerNorm gamma/beta, pooler + NSP head (kept: model.nsp_head), buffers and
    tied decoder copies (checked, then dropped)."""
    _, path = saved("bert")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in tensors.items()}
    old["bert.pooler.dense.weight"] = np.ones((48, 48), np.float32)
    old["bert.pooler.dense.bias"] = np.ones((48,), np.float32)
    old["cls.seq_relationship.weight"] = np.ones((2, 48), np.float32)
    old["cls.seq_relationship.bias"] = np.ones((2,), np.float32)
    old["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    old["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"]
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["architectures"] = ["BertForPreTraining"]
    pre = tmp_path / "pretraining"
    pre.mkdir()
    save_file(old, str(pre / "model.safetensors"), metadata={"format": "pt"})
    (pre / "config.json").write_text(json.dumps(config))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pooler and NSP head are kept (model.nsp_head), not dropped
        cfg, params = from_hf(str(pre))
    assert cfg.model.nsp_head
    _, expected = from_hf(path)
    expected["pooler"] = {"kernel": np.ones((48, 48), np.float32), "bias": np.ones((48,), np.float32)}
    expected["nsp_head"] = {"kernel": np.ones((48, 2), np.float32), "bias": np.ones((2,), np.float32)}
    hf.assert_same_params(expected, params)
    # A pooler without a next-sentence head has no place in BertForMaskedLM: dropped, with a warning naming it.
    for name in ("cls.seq_relationship.weight", "cls.seq_relationship.bias"):
        del old[name]
    save_file(old, str(pre / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="bert.pooler.dense.bias, bert.pooler.dense.weight"):
        cfg, params = from_hf(str(pre))
    assert not cfg.model.nsp_head and "pooler" not in params
