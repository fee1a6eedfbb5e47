"""LLaMA: parity with transformers' LlamaForCausalLM both ways (GQA, explicit head_dim, tied/untied, RoPE scaling
linear / llama3 / yarn / longrope, v5 rope_parameters and v4 rope_theta/rope_scaling configs), bit-exact round trip,
every rope_type's config carried both ways, context length in the config."""

import json
import os

import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.convert import from_hf, to_hf

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 8.0, "beta_slow": 1.0}  # head_dim 8: frequency 0 kept, 1-3 interpolated; attention factor 1.14
# Phi-3 style: no factor (transformers derives max_position_embeddings / original = 4, attention factor 1.22);
# inputs of 17 tokens use long_factor, of 12 short_factor.
LONGROPE = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": 16}
CASES = {
    "gqa_untied": {},
    "tied_linear": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                   "factor": 2.0}),
    "head_dim12_llama3": dict(head_dim=12, num_key_value_heads=3, rope_parameters=LLAMA3),
    "yarn": dict(rope_parameters=YARN),
    "longrope": dict(rope_parameters=LONGROPE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_exports_bit_exact(hf, saved, tmp_path, case):
    if case == "gqa_untied":
        model, path = saved("llama")
    else:
        model = hf.model("llama", **CASES[case])
        path = hf.save(model, tmp_path / case)
    cfg, params = from_hf(path)
    m = cfg.model
    assert (m.num_heads, m.kv_heads, m.dim_per_head) == (6, model.config.num_key_value_heads, model.config.head_dim)
    assert m.tied == model.config.tie_word_embeddings and ("lm_head" in params) != m.tied
    inputs = [hf.ids((2, 17), seed=1)] + ([hf.ids((1, 64), seed=2)] if case == "gqa_untied" else [])
    inputs += [hf.ids((2, 12), seed=4)] if case == "longrope" else []
    for ids in inputs:
        err = np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max()
        print(f"llama {case} import: max |logits - transformers| = {err:.2e}")
        assert err < hf.TOL, err
    to_hf(cfg, params, tmp_path / "out")  # import -> export: the same tensors, bit for bit
    hf.assert_same_tensors(hf.tensors(path), hf.tensors(tmp_path / "out"))


def test_v4_config_keys_rope_theta_and_rope_scaling(hf, tmp_path):
    """A transformers 4.x config.json (rope_theta + rope_scaling with the legacy "type" key) reads the same."""
    model = hf.model("llama", **CASES["tied_linear"])
    path = hf.save(model, tmp_path / "v4")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    del config["rope_parameters"]
    config.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    cfg, params = from_hf(path)
    assert (cfg.model.rope_theta, dict(cfg.model.rope_scaling)) == (500.0, {"rope_type": "linear", "factor": 2.0})
    ids = hf.ids((2, 17), seed=1)
    assert np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max() < hf.TOL


@pytest.mark.parametrize("tied", [False, True])
def test_export_of_jaxctx_model_loads_and_matches(hf, tmp_path, tied):
    model_cfg = {"family": "llama", "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "d_model": 48,
                 "d_ff": 72, "vocab_size": 101, "tie_embeddings": tied, "max_positions": 64}
    if tied:  # llama3 scaling without original_max_position_embeddings: ours falls back to max_positions
        model_cfg.update(head_dim=12, rope_theta=500.0,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0})
    cfg = config_lib.from_dict({"model": model_cfg, "data": {"seq_len": 64}}).resolved()
    params = hf.jaxctx_params(cfg)
    to_hf(cfg, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["tie_word_embeddings"] == tied
    if tied:
        assert config["rope_parameters"]["original_max_position_embeddings"] == 64
    model = hf.load(tmp_path / "out", "llama")
    ids = hf.ids((2, 17), seed=3)
    err = np.abs(hf.ours(cfg, params, ids) - hf.logits(model, ids)).max()
    print(f"llama export tied={tied}: max |logits - transformers| = {err:.2e}")
    assert err < hf.TOL, err


def test_bf16_import_export_is_bit_exact(hf, tmp_path):
    model = hf.model("llama", **CASES["head_dim12_llama3"])
    path = hf.save(model, tmp_path / "bf16", dtype="bfloat16")
    cfg, params = from_hf(path)
    assert params["token_embed"]["embedding"].dtype == np.float32
    to_hf(cfg, params, tmp_path / "out", dtype="bfloat16")
    exported = hf.tensors(tmp_path / "out")
    assert {str(a.dtype) for a in exported.values()} == {"bfloat16"}
    hf.assert_same_tensors(hf.tensors(path), exported)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_longer_context_is_written_to_the_config(hf, tmp_path):
    path = hf.save(hf.model("llama", num_hidden_layers=1, rope_parameters=LLAMA3), tmp_path / "short")
    cfg, params = from_hf(path, max_positions=256)
    assert cfg.model.max_positions == 256
    assert cfg.model.rope_scaling["original_max_position_embeddings"] == 16  # the frequencies do not move
    to_hf(cfg, params, tmp_path / "long")
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    assert config["rope_parameters"] == LLAMA3
    with pytest.raises(ValueError, match="llama has no learned position table"):
        from_hf(path, max_positions=256, extend_positions="tile")


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_rope_scaling_extends_the_context(hf, tmp_path, rope_type):
    """from-hf --max-positions 4x --rope-scaling: factor 4 over the model's own 16 positions; with linear scaling
    position 4i of the extended model is position i of the original (position interpolation, exactly)."""
    path = hf.save(hf.model("llama", num_hidden_layers=1, max_position_embeddings=16), tmp_path / "short")
    base, params = from_hf(path)
    cfg, same = from_hf(path, max_positions=64, rope_scaling=rope_type)
    want = {"rope_type": rope_type, "factor": 4.0}
    if rope_type == "yarn":
        want["original_max_position_embeddings"] = 16
    assert base.model.max_positions == 16 and cfg.model.max_positions == 64 and dict(cfg.model.rope_scaling) == want
    ids = hf.ids((1, 12))
    short = hf.ours(base, params, ids)
    long = hf.ours(cfg, same, ids, positions=np.arange(12, dtype=np.int32)[None] * 4)
    if rope_type == "linear":
        np.testing.assert_allclose(long, short, atol=2e-5)
    to_hf(cfg, same, tmp_path / "long")  # transformers reads the scaling back
    config = json.loads((tmp_path / "long" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["rope_parameters"]["rope_type"] == rope_type
    for kwargs, message in (({"max_positions": 16, "rope_scaling": "linear"}, "must exceed the model's context"),
                            ({"max_positions": 64, "rope_scaling": "dynamic"}, "not one of linear, yarn"),
                            ({"rope_scaling": "linear"}, "needs max_positions")):
        with pytest.raises(ValueError, match=message):
            from_hf(path, **kwargs)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "proportional", "rope_theta": 1e4}, "rope_type='proportional' is not supported"),
    ({"rope_type": "linear", "rope_theta": 1e4}, "rope linear scaling lacks factor"),
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0] * 4},
     "rope_parameters.short_factor=<list of 1> must be a list of 4 positive numbers"),
])
def test_unsupported_rope_is_named(saved, tmp_path, rope, message):
    _, path = saved("llama")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["rope_parameters"] = rope
    config["hidden_act"] = "gelu"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(ValueError, match=message) as err:
        from_hf(str(bad))
    assert "hidden_act='gelu' is not supported" in str(err.value)  # every problem in one message


# Our rope_scaling with every field explicit, as it must come back after to-hf -> from-hf.
ROPE_ROUND_TRIP = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 0.8,
             "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [1.0, 3.0, 6.0, 9.0],
                 "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.1},
}


@pytest.mark.parametrize("kind", list(ROPE_ROUND_TRIP))
def test_rope_config_carried_both_ways(tmp_path, kind):
    """to-hf writes a config.json transformers 5 reads back as the same rope_parameters; from-hf of it gives our
    rope_scaling back unchanged (no weights needed: the config half of to_hf / from_hf)."""
    import transformers as T

    from jaxctx.config import ModelConfig
    from jaxctx.convert import hf_llama

    scaling = ROPE_ROUND_TRIP[kind]
    m = ModelConfig(family="llama", num_layers=1, num_heads=6, num_kv_heads=2, head_dim=8, d_model=48,
                    vocab_size=101, max_positions=64, rope_theta=500.0, rope_scaling=scaling)
    m.validate()
    (tmp_path / "config.json").write_text(json.dumps(hf_llama.config_to_hf(m)))
    assert T.AutoConfig.from_pretrained(tmp_path).rope_parameters == {"rope_theta": 500.0, **scaling}
    back = hf_llama.config_from_hf(json.loads((tmp_path / "config.json").read_text()), "config.json")
    assert (back["rope_theta"], back["rope_scaling"], back["max_positions"]) == (500.0, scaling, 64)
