"""GPT-2: parity with transformers' GPT2LMHeadModel both ways, bit-exact round trip, prefixes, longer context."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxctx import config as config_lib
from jaxctx.convert import from_hf, to_hf


def test_import_matches_transformers(hf, saved):
    model, path = saved("gpt2")
    cfg, params = from_hf(path)
    m = cfg.model
    assert (m.family, m.num_layers, m.num_heads, m.dim_per_head, m.vocab_size, m.max_positions) == \
        ("gpt2", 3, 6, 8, 101, 64)
    for ids in (hf.ids((2, 17), seed=1), hf.ids((2, 17), seed=2), hf.ids((1, 64), seed=3)):  # 64 = n_positions
        err = np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max()
        print(f"gpt2 import: max |logits - transformers| = {err:.2e}")
        assert err < hf.TOL, err
    # Right padding: HF masks the pad keys, we give padding its own segment; real tokens must agree.
    ids = hf.ids((2, 17), seed=4)
    mask = np.ones((2, 17), np.int32)
    mask[1, 7:] = 0
    ours = hf.ours(cfg, params, ids, segment_ids=mask)
    ref = hf.logits(model, ids, attention_mask=mask)
    assert np.abs((ours - ref)[mask.astype(bool)]).max() < hf.TOL


def test_export_of_jaxctx_model_loads_and_matches(hf, tmp_path):
    cfg = config_lib.from_dict({"model": {"family": "gpt2", "num_layers": 3, "num_heads": 6, "d_model": 48,
                                          "vocab_size": 101, "max_positions": 40}, "data": {"seq_len": 40}})
    cfg = cfg.resolved()
    params = hf.jaxctx_params(cfg)
    to_hf(cfg, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_positions"] == 40 and config["architectures"] == ["GPT2LMHeadModel"]
    model = hf.load(tmp_path / "out", "gpt2")
    ids = hf.ids((2, 40), seed=5)
    err = np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max()
    print(f"gpt2 export: max |logits - transformers| = {err:.2e}")
    assert err < hf.TOL, err


def test_import_export_is_bit_exact(hf, saved, tmp_path):
    _, path = saved("gpt2")
    cfg, params = from_hf(path)
    to_hf(cfg, params, tmp_path / "out")
    hf.assert_same_tensors(hf.tensors(path), hf.tensors(tmp_path / "out"))


def test_keys_without_prefix_buffers_and_tied_head_copy(hf, saved, tmp_path):
    """Original hub-style checkpoints: no `transformer.` prefix, causal-mask buffers, an lm_head copy of wte."""
    _, path = saved("gpt2")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    legacy["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    legacy["lm_head.weight"] = legacy["wte.weight"].copy()
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    save_file(legacy, str(legacy_dir / "model.safetensors"), metadata={"format": "pt"})
    (legacy_dir / "config.json").write_text((open(os.path.join(path, "config.json")).read()))
    _, expected = from_hf(path)
    _, params = from_hf(str(legacy_dir))
    hf.assert_same_params(expected, params)
    # A head that differs from wte in a tied config is refused rather than dropped.
    legacy["lm_head.weight"] = legacy["wte.weight"] + 1
    save_file(legacy, str(legacy_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        from_hf(str(legacy_dir))


def test_untied_head_both_ways(hf, tmp_path):
    model = hf.model("gpt2", n_layer=1, tie_word_embeddings=False)
    path = hf.save(model, tmp_path / "untied")
    cfg, params = from_hf(path)
    assert not cfg.model.tied and params["lm_head"]["kernel"].shape == (48, 101)
    ids = hf.ids((2, 17), seed=6)
    assert np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max() < hf.TOL
    to_hf(cfg, params, tmp_path / "out")
    hf.load(tmp_path / "out", "gpt2")
    hf.assert_same_tensors(hf.tensors(path), hf.tensors(tmp_path / "out"))


@pytest.mark.parametrize("method", ["tile", "copy", "interpolate"])
def test_extend_positions(hf, saved, tmp_path, method):
    model, path = saved("gpt2")
    _, base = from_hf(path)
    cfg, params = from_hf(path, max_positions=150, extend_positions=method)
    old, new = base["pos_embed"]["embedding"], params["pos_embed"]["embedding"]
    assert cfg.model.max_positions == 150 and new.shape == (150, 48)
    if method == "tile":
        np.testing.assert_array_equal(new[64:128], old)
        np.testing.assert_array_equal(new[128:], old[:22])
    if method == "interpolate":
        np.testing.assert_array_equal(new[[0, -1]], old[[0, -1]])
        np.testing.assert_allclose(new[1], old[0] + (old[1] - old[0]) * 63 / 149, atol=1e-6)
    if method == "copy":  # rows 64.. freshly drawn from the model's own init N(0, initializer_range), fixed seed
        std = cfg.model.initializer_range
        fresh = new[64:]
        assert np.isfinite(fresh).all() and not np.any(np.all(fresh == 0, axis=1))
        assert abs(float(fresh.mean())) < 0.1 * std and abs(float(fresh.std()) - std) < 0.1 * std
        assert not any(np.array_equal(row, o) for row in fresh for o in old)  # not copies of learned rows
        _, again = from_hf(path, max_positions=150, extend_positions=method)
        np.testing.assert_array_equal(again["pos_embed"]["embedding"], new)  # deterministic
    if method in ("tile", "copy"):  # the original rows are kept: short inputs are unchanged
        np.testing.assert_array_equal(new[:64], old)
        ids = hf.ids((1, 64), seed=7)
        assert np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max() < hf.TOL
    # The longer model exports with n_positions = 150 and transformers agrees on a 150-token input.
    to_hf(cfg, params, tmp_path / "long")
    assert json.loads((tmp_path / "long" / "config.json").read_text())["n_positions"] == 150
    long_model = hf.load(tmp_path / "long", "gpt2")
    ids = hf.ids((1, 150), seed=8)
    assert np.abs(hf.ours(cfg, params, ids) - hf.logits(long_model, ids)).max() < hf.TOL
