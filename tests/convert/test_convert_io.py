"""Directories, dtypes, the CLI, training round trips and every kind of bad input."""

import json
import os
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxctx import config as config_lib
from jaxctx.checkpoint import load_params
from jaxctx.cli import main
from jaxctx.convert import (ConvertError, HFFileNotFoundError, OutputExistsError, PickleCheckpointError,
                            TensorMismatchError, UnsupportedModelError, from_hf, to_hf)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _copy_hf_dir(src, dst, tensors=None, config=None):
    """A modified copy of a HF directory: replaced tensors and/or config.json."""
    os.makedirs(dst)
    if tensors is None:
        tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config is None:
        config = json.loads(open(os.path.join(src, "config.json")).read())
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------
# Sharding and dtypes
# ----------------------------------------------------------------------------------------------------------

def test_sharded_export_and_reimport(hf, saved, tmp_path):
    model, path = saved("gpt2")
    cfg, params = from_hf(path)
    out = tmp_path / "sharded"
    to_hf(cfg, params, out, shard_size="30KB")
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(os.path.getsize(out / n) <= 30_000 + 20_000 for n in shards)  # no tensor here exceeds 20 KB
    index = json.loads((out / "model.safetensors.index.json").read_text())
    originals = hf.tensors(path)
    assert sorted(index["weight_map"]) == sorted(originals)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in originals.values())
    hf.assert_same_tensors(originals, hf.tensors(out))
    # Re-import of the sharded directory gives the same params; transformers loads it too.
    _, again = from_hf(str(out))
    hf.assert_same_params(params, again)
    ids = hf.ids((2, 17), seed=1)
    assert np.abs(hf.ours(cfg, params, ids) - hf.logits(hf.load(out, "gpt2"), ids)).max() < hf.TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_export_and_import(hf, saved, tmp_path, dtype):
    model, path = saved("bert")
    cfg, params = from_hf(path)
    to_hf(cfg, params, tmp_path / dtype, dtype=dtype)
    tensors = hf.tensors(tmp_path / dtype)
    assert {str(a.dtype) for a in tensors.values()} == {dtype}
    assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
    _, again = from_hf(str(tmp_path / dtype))  # back to f32: exactly the rounded values
    rounded = tensors["cls.predictions.bias"].dtype
    hf.assert_same_params(params, again, cast=lambda a: a.astype(rounded).astype(np.float32))
    hf_model = hf.load(tmp_path / dtype, "bert")  # loaded as f32: same values as ours
    ids = hf.ids((2, 17), seed=2)
    assert np.abs(hf.ours(cfg, again, ids) - hf.logits(hf_model, ids)).max() < hf.TOL


# ----------------------------------------------------------------------------------------------------------
# CLI, training workdirs, train.init_from
# ----------------------------------------------------------------------------------------------------------

def test_cli_round_trip_through_training(hf, tmp_path, capsys):
    """HF -> from-hf -> train.init_from (2 steps) -> to-hf of the training workdir -> transformers agrees."""
    from jaxctx.train.loop import run

    # A GPT-2 shaped like configs/tiny.yaml, with tokenizer files next to it.
    model = hf.model("gpt2", n_embd=64, n_head=2, n_layer=2, vocab_size=512, n_positions=128)
    src = hf.save(model, tmp_path / "hf")
    for name, text in (("tokenizer.json", '{"version": "1.0"}'), ("tokenizer_config.json", "{}")):
        (tmp_path / "hf" / name).write_text(text)

    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", src, str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "from-hf: gpt2 2 layers" in out and "tokenizer.json" in out
    assert sorted(os.listdir(ckpt / "hf_files")) == ["config.json", "generation_config.json", "tokenizer.json",
                                                    "tokenizer_config.json"]
    converted = config_lib.load(ckpt / "config.yaml")  # a ready-to-train config
    assert converted.model.d_model == 64 and converted.data.tokenizer == str(ckpt / "hf_files")
    params, meta = load_params(ckpt)
    assert meta["step"] == 0 and meta["source"]["model_type"] == "gpt2"

    workdir = tmp_path / "work"
    cfg = config_lib.load(TINY, ["train.steps=2", "data.validation_fraction=0", f"train.init_from={ckpt}"])
    assert run(cfg, str(workdir), devices=jax.devices()[:1]) == 0
    assert "initialised params from" in capsys.readouterr().err
    trained, meta = load_params(workdir)
    assert meta["step"] == 2
    # Two small Adam steps away from the imported params (a fresh init would be ~0.1 away everywhere).
    assert jax.tree.structure(params) == jax.tree.structure(trained)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained))]
    assert 0 < max(moved) < 5e-3, moved

    hf_out = tmp_path / "hf_out"
    assert main(["convert", "to-hf", str(workdir), str(hf_out)]) == 0
    assert "to-hf: gpt2 step 2" in capsys.readouterr().out
    config = json.loads((hf_out / "config.json").read_text())
    assert config["n_positions"] == 128 and config["n_embd"] == 64  # the model's own max_positions
    # Tokenizer files and source config keys (token ids) came along through init_from's hf_files/.
    assert (hf_out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert config["bos_token_id"] == 0
    ids = hf.ids((2, 17), seed=3)
    err = np.abs(hf.ours(cfg, trained, ids) - hf.logits(hf.load(hf_out, "gpt2"), ids)).max()
    print(f"gpt2 trained workdir export: max |logits - transformers| = {err:.2e}")
    assert err < hf.TOL, err


def test_cli_max_positions(saved, tmp_path, capsys):
    _, path = saved("gpt2")
    out = tmp_path / "long"
    assert main(["convert", "from-hf", path, str(out), "--max-positions", "100", "--extend-positions",
                 "interpolate"]) == 0
    assert "max_positions 100" in capsys.readouterr().out
    params, meta = load_params(out)
    assert params["pos_embed"]["embedding"].shape == (100, 48) and meta["config"]["model"]["max_positions"] == 100
    assert main(["convert", "to-hf", str(out), str(tmp_path / "hf")]) == 0
    assert "no tokenizer files found" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_positions"] == 100


def test_cli_rope_scaling(saved, tmp_path, capsys):
    _, path = saved("llama")
    hf_positions = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "long"
    assert main(["convert", "from-hf", path, str(out), "--max-positions", str(4 * hf_positions),
                 "--rope-scaling", "yarn"]) == 0
    assert f"max_positions {4 * hf_positions}" in capsys.readouterr().out
    model = load_params(out)[1]["config"]["model"]
    assert model["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": hf_positions}
    assert main(["convert", "from-hf", path, str(tmp_path / "bad"), "--rope-scaling", "linear"]) == 2
    err = capsys.readouterr().err
    assert "rope_scaling='linear' needs max_positions (--max-positions N)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_is_refused_and_never_unpickled(saved, tmp_path, capsys):
    _, path = saved("gpt2")
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    marker = tmp_path / "unpickled.txt"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin.*never unpickles.*save_pretrained"):
        from_hf(str(bad))
    assert main(["convert", "from-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxctx convert: error:") and "pytorch_model.bin" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_config_and_weights(saved, tmp_path):
    _, path = saved("gpt2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(str(tmp_path / "nowhere"))
    empty = tmp_path / "no_config"
    empty.mkdir()
    with pytest.raises(HFFileNotFoundError, match="config.json is missing"):
        from_hf(str(empty))
    (empty / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(HFFileNotFoundError, match="has no weights: expected model.safetensors"):
        from_hf(str(empty))
    # An index naming a shard that is not there.
    (empty / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(HFFileNotFoundError, match="model-00001-of-00002.safetensors is missing"):
        from_hf(str(empty))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type='mistral' is not supported; jaxctx converts gpt2, bert, llama"),
    ({"architectures": ["GPT2DoubleHeadsModel"]}, "jaxctx converts GPT2LMHeadModel, GPT2Model, "
                                                   "GPT2ForSequenceClassification, GPT2ForTokenClassification"),
    ({"activation_function": "relu", "n_head": None}, "n_head is missing; activation_function='relu'"),
])
def test_unsupported_config(saved, tmp_path, change, message):
    _, path = saved("gpt2")
    config = {**json.loads(open(os.path.join(path, "config.json")).read()), **change}
    bad = _copy_hf_dir(path, tmp_path / "bad", config=config)
    with pytest.raises(UnsupportedModelError, match=message):
        from_hf(bad)


def test_missing_extra_and_misshapen_tensors_in_one_error(saved, tmp_path):
    _, path = saved("gpt2")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:63]
    tensors["transformer.ln_f.bias"] = np.zeros(48, np.int32)
    bad = _copy_hf_dir(path, tmp_path / "bad", tensors=tensors)
    with pytest.raises(TensorMismatchError) as err:
        from_hf(bad)
    text = str(err.value)
    for part in ("missing tensors (1): transformer.h.1.mlp.c_fc.bias [192]",
                 "unexpected tensors (1): transformer.h.0.attn.extra [3]",
                 "transformer.wpe.weight is [63, 48], expected [64, 48]",
                 "transformer.ln_f.bias has dtype I32"):
        assert part in text, text


def test_to_hf_rejects_params_of_another_config(hf, saved, tmp_path):
    _, path = saved("gpt2")
    cfg, params = from_hf(path)
    params["layers"]["mlp"]["up_kernel"] = params["layers"]["mlp"]["up_kernel"][:, :, :100]
    del params["final_norm"]
    with pytest.raises(TensorMismatchError, match=r"missing params: final_norm/bias \[48\].*"
                                                  r"layers_0/mlp/up_kernel is \[48, 100\], expected \[48, 192\]"):
        to_hf(cfg, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_needs_force(saved, tmp_path, capsys):
    _, path = saved("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "from-hf", path, str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    cfg, params = from_hf(path)
    with pytest.raises(OutputExistsError):
        to_hf(cfg, params, out)
    assert main(["convert", "from-hf", path, str(out), "--force"]) == 0
    assert "keep.txt" not in os.listdir(out) and "config.yaml" in os.listdir(out)
    assert main(["convert", "to-hf", str(out), str(out), "--force"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="would replace the input"):
        to_hf(cfg, params, out / "hf_files", force=True, tokenizer_dir=str(out / "hf_files"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        to_hf(cfg, params, tmp_path / "file")


def test_failure_mid_write_leaves_no_out_dir(saved, tmp_path, monkeypatch):
    from jaxctx.convert import io

    _, path = saved("gpt2")
    cfg, params = from_hf(path)
    real_save = io.save_file
    calls = []

    def save_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        to_hf(cfg, params, tmp_path / "out", shard_size="30KB")
    assert len(calls) == 2 and os.listdir(tmp_path) == []  # no OUT_DIR, no temporary directory left

    def fail(*args, **kwargs):
        raise OSError("interrupted")

    monkeypatch.setattr(io, "copy_side_files", fail)  # after the Orbax checkpoint was written
    with pytest.raises(OSError, match="interrupted"):
        from jaxctx.convert import import_checkpoint
        import_checkpoint(path, str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path) == []
