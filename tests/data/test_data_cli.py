"""`jaxctx data inspect` and `jaxctx tokenizer train` through the real command dispatcher."""

import json

import pytest

from jaxctx.cli import main


def test_data_inspect_json_on_stdlib(hf_cache, capsys):
    rc = main(["data", "inspect", "--batches", "5", "--json", "--set", "data.max_documents=60",
               "--set", f"data.cache_dir={hf_cache}", "--set", "train.batch_size=4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert any(line.startswith("batch 4: shape [4, 256]") for line in out)
    summary = json.loads(out[-1])
    assert summary["batches"] == 5 and summary["batch_shape"] == [4, 256]
    assert summary["padding_fraction"] < 0.05
    assert summary["tokens_per_sec"] > 0 and summary["vocab_size"] == 263


def test_data_inspect_with_config_file_and_bad_vocab(hf_cache, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(f"model:\n  vocab_size: 128\ndata:\n  cache_dir: {hf_cache}\n  max_documents: 5\n")
    assert main(["data", "inspect", "--config", str(config), "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size=128" in err and "263" in err


def test_tokenizer_train_then_autotokenizer_loads(hf_cache, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--data", "stdlib", "--vocab-size", "400", "--out", str(out),
               "--max-documents", "20", "--cache-dir", hf_cache])
    assert rc == 0 and "bytes/token" in capsys.readouterr().out
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == 400
    code = "import os\n\ndef main():\n    return os.getcwd()\n"
    assert hf.decode(hf(code, add_special_tokens=False)["input_ids"]) == code
    # the directory now feeds data inspect
    rc = main(["data", "inspect", "--batches", "2", "--json", "--set", f"data.tokenizer={out}",
               "--set", "data.max_documents=20", "--set", f"data.cache_dir={hf_cache}"])
    assert rc == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["vocab_size"] == 400
    # refuses to overwrite, with a clear message
    assert main(["tokenizer", "train", "--data", "stdlib", "--vocab-size", "400", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_zero_batches_is_an_argument_error():
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--batches", "0"])
