"""`jaxctx convert from-hf / to-hf` with gs:// inputs and outputs, against a GCS API on localhost
(tests/gcs_emulator.py), equal to the same conversion between local directories.

The conversions stage through a local temp dir (jaxctx/convert/staging.py), so no TensorStore call reaches the
emulator (which cannot serve Orbax's OCDBT commits, see tests/test_gcs_workdir.py): a workdir or checkpoint made
locally is uploaded object by object, as `gcloud storage cp -r` would.
"""

import json
import os

import numpy as np
import pytest
import yaml

from gcs_emulator import BUCKET, emulated_gcs
from jaxctx import config as config_lib
from jaxctx import storage
from jaxctx.checkpoint import Checkpointer, load_params
from jaxctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
GS = f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with emulated_gcs(tmp_path_factory.mktemp("gcs") / "emulator.log") as emulator:
        yield emulator


def _upload(local_dir, url):
    storage.copy_files(str(local_dir), url, storage.files_under(str(local_dir)))


def _download(url, local_dir):
    storage.copy_files(url, str(local_dir), storage.files_under(url))
    return str(local_dir)


def _workdir(path, hf):
    """A training workdir as the loop leaves it: steps 2 and 4 (params + optimizer state), metrics.jsonl."""
    cfg = config_lib.load(TINY, ["model.attention=reference"]).resolved()
    ckpt = Checkpointer(str(path / "checkpoints"), keep=3, async_save=False)
    for step, seed in ((2, 1), (4, 2)):
        params = hf.jaxctx_params(cfg, seed=seed)
        ckpt.save(step, params, {"mu": params}, {"config": cfg.to_dict(), "step": step})
    ckpt.close()
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in (1, 2, 3, 4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _same_dirs(local, other, *, readme_paths=()):
    """Same file names, same bytes (the model card with its source paths swapped: (local, url) pairs)."""
    assert sorted(os.listdir(local)) == sorted(os.listdir(other))
    for name in os.listdir(local):
        a, b = open(os.path.join(local, name), "rb").read(), open(os.path.join(other, name), "rb").read()
        for path, url in readme_paths if name == "README.md" else ():
            a = a.replace(path.encode(), url.encode())
        assert a == b, name


def test_to_hf_from_a_gs_workdir_to_gs_equals_the_local_export(gcs, hf, tmp_path, monkeypatch, capsys):
    work = _workdir(tmp_path / "work", hf)
    _upload(work, f"{GS}/work")
    assert main(["convert", "to-hf", work, str(tmp_path / "local" / "hf")]) == 0

    copied = []
    real_copy = storage.copy_file
    monkeypatch.setattr(storage, "copy_file", lambda src, dst: (copied.append(src), real_copy(src, dst)))
    assert main(["convert", "to-hf", f"{GS}/work", f"{GS}/hf"]) == 0
    assert f"-> {GS}/hf:" in capsys.readouterr().out
    # Only the newest step's params and meta came down: no optimizer state, no older step.
    downloaded = [c for c in copied if c.startswith(f"{GS}/work/")]
    assert any("/checkpoints/4/params/" in c for c in downloaded)
    assert not [c for c in downloaded if "/opt_state/" in c or "/checkpoints/2/" in c]

    got = _download(f"{GS}/hf", tmp_path / "hf-gs")
    _same_dirs(str(tmp_path / "local" / "hf"), got, readme_paths=[(work, f"{GS}/work")])
    assert "config.json" in os.listdir(got) and "model.safetensors" in os.listdir(got)

    # Never overwritten without --force; with it, replaced and stale objects removed.
    storage.write_atomic(f"{GS}/hf/stale.txt", "old")
    assert main(["convert", "to-hf", f"{GS}/work", f"{GS}/hf", "--step", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output directory {GS}/hf exists and is not empty" in err
    assert storage.read_bytes(f"{GS}/hf/model.safetensors") == open(os.path.join(got, "model.safetensors"),
                                                                     "rb").read()
    assert main(["convert", "to-hf", f"{GS}/work", f"{GS}/hf", "--step", "2", "--force"]) == 0
    assert sorted(storage.listdir(f"{GS}/hf")) == sorted(os.listdir(got))
    assert main(["convert", "to-hf", work, str(tmp_path / "local-2" / "hf"), "--step", "2"]) == 0
    _same_dirs(str(tmp_path / "local-2" / "hf"), _download(f"{GS}/hf", tmp_path / "hf-gs-2"),
               readme_paths=[(work, f"{GS}/work")])
    # A step that is not there is named with the steps that are.
    assert main(["convert", "to-hf", f"{GS}/work", str(tmp_path / "x"), "--step", "3"]) == 2
    assert "has no checkpoint step 3; it has steps 2, 4" in capsys.readouterr().err


def test_from_hf_from_gs_to_gs_equals_the_local_import(gcs, hf, tmp_path, capsys):
    from jaxctx.data.bpe import train_bpe

    src = hf.save(hf.model("gpt2", vocab_size=300, bos_token_id=1, eos_token_id=2), tmp_path / "src")
    train_bpe([["def main():\n    return 0\n", "héllo wörld"] * 20], 300, src)
    _upload(src, f"{GS}/hf-src")
    assert main(["convert", "from-hf", src, str(tmp_path / "ckpt-local")]) == 0
    assert main(["convert", "from-hf", f"{GS}/hf-src", f"{GS}/ckpt"]) == 0

    got = _download(f"{GS}/ckpt", tmp_path / "ckpt-gs")
    want_params, want_meta = load_params(str(tmp_path / "ckpt-local"))
    params, meta = load_params(got)
    hf.assert_same_params(want_params, params)
    assert meta["source"]["path"] == f"{GS}/hf-src"  # the checkpoint records where it came from, not the temp dir
    config = yaml.safe_load(open(os.path.join(got, "config.yaml")))
    assert config["data"]["tokenizer"] == f"{GS}/ckpt/hf_files"
    _same_dirs(str(tmp_path / "ckpt-local" / "hf_files"), os.path.join(got, "hf_files"))
    # `train.py --config gs://.../config.yaml` as from-hf suggests: the config and its gs:// tokenizer load.
    from jaxctx.data.tokenizer import load_tokenizer

    cfg = config_lib.load(f"{GS}/ckpt/config.yaml")
    assert cfg.to_dict() == config_lib.load(str(tmp_path / "ckpt-local" / "config.yaml"), [
        f"data.tokenizer={GS}/ckpt/hf_files"]).to_dict()
    text = "def main():\n    return 0\n"
    [got_ids], [want_ids] = (load_tokenizer(t).encode_batch([text]) for t in (cfg.data.tokenizer, src))
    assert len(want_ids) > 0 and got_ids.tolist() == want_ids.tolist()

    # The gs:// checkpoint exports back to the same HF directory as the local one.
    assert main(["convert", "to-hf", f"{GS}/ckpt", str(tmp_path / "from-gs" / "hf")]) == 0
    assert f"tokenizer: {GS}/ckpt/hf_files;" in capsys.readouterr().out  # where it is, not the staging copy
    assert main(["convert", "to-hf", str(tmp_path / "ckpt-local"), str(tmp_path / "from-local" / "hf")]) == 0
    _same_dirs(str(tmp_path / "from-local" / "hf"), str(tmp_path / "from-gs" / "hf"),
               readme_paths=[(str(tmp_path / "ckpt-local"), f"{GS}/ckpt"), (src, f"{GS}/hf-src")])
    exported = (tmp_path / "from-gs" / "hf" / "tokenizer.json").read_bytes()
    with open(os.path.join(src, "tokenizer.json"), "rb") as f:
        assert exported == f.read()


def test_labels_and_tensorstore_timeouts_on_gs(gcs, monkeypatch):
    from jaxctx.data.errors import DataError
    from jaxctx.data.labels import LabelSet, load_labels, save_labels

    run = f"{GS}/labels-run"
    path = save_labels(run, LabelSet(("neg", "pos"), "names"), {"task": "sequence_classification"})
    assert path == f"{run}/labels.json" and load_labels(run).names == ("neg", "pos")
    with pytest.raises(DataError, match="names the labels"):
        save_labels(run, LabelSet(("a", "b"), "names"))
    assert load_labels(path).names == ("neg", "pos") and storage.listdir(run) == ["labels.json"]

    # A gs:// checkpoint (train, predict, evaluate, convert) gives TensorStore's curl low-speed limits unless set.
    monkeypatch.delenv("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", raising=False)
    monkeypatch.setenv("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "7")
    Checkpointer(f"{GS}/labels-run", read_only=True).close()
    assert os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] == "7"
    assert os.environ["TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"] == "1024"
