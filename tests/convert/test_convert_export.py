"""What `jaxctx convert to-hf` ships besides the weights, checked with transformers itself as the client (offline):
the tokenizer (byte tokenizer written as tokenizer.json, or a trained BPE copied), token ids in config.json and
generation_config.json, the README.md model card, and transformers' pipelines agreeing with jaxctx's own logits.

Two tiny models are trained once per module by the training loop `python train.py` runs (gpt2 with the byte
tokenizer; llama with a BPE from `jaxctx tokenizer train`); BERT uses random params saved as a checkpoint.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.checkpoint import load_params, save_params
from jaxctx.cli import main
from jaxctx.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# The smallest run of configs/tiny.yaml that still trains: 3 steps of 4 x 64 tokens, one checkpoint, no eval.
# (So short a run greedily repeats one frequent token; the per-step logits below are what tell models apart.)
FAST = ["train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.batch_size=4", "data.seq_len=64",
        "data.max_documents=20", "data.validation_fraction=0", "model.attention=reference"]
TEXTS = ["def main():\n    return 0\n", "héllo wörld, 日本語 and 🎉 emoji", "  two  spaces\ttab\r\n\x00\x7f"]
PROMPT = "import os\ndef "
NEW_TOKENS = 6


def _train(workdir, overrides):
    from jaxctx.train.loop import run

    cfg = config_lib.load(TINY, FAST + overrides)
    assert run(cfg, str(workdir), devices=jax.devices()[:1]) == 0
    return cfg


def _export(src, out, *extra):
    assert main(["convert", "to-hf", str(src), str(out), *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """(cfg, workdir, export) of a gpt2 trained with the byte tokenizer."""
    base = tmp_path_factory.mktemp("byte")
    cfg = _train(base / "work", [])
    return cfg, str(base / "work"), _export(base / "work", base / "hf")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """(cfg, workdir, export, tokenizer dir) of a llama trained with a BPE from `jaxctx tokenizer train`."""
    base = tmp_path_factory.mktemp("bpe")
    tok = str(base / "bpe")
    assert main(["tokenizer", "train", "--data", "stdlib", "--vocab-size", "300", "--max-documents", "20",
                 "--out", tok]) == 0
    cfg = _train(base / "work", ["model.family=llama", f"data.tokenizer={tok}"])
    return cfg, str(base / "work"), _export(base / "work", base / "hf"), tok


def _greedy(hf, cfg, params, ids, n, eos):
    """Greedy decoding over jaxctx logits -> (token ids, [logits of each step]): one fixed-length causal forward per
    token (right padding cannot reach earlier positions), stopping after EOS as transformers' generate does."""
    seq, steps = list(ids), []
    width = len(ids) + n
    for _ in range(n):
        x = np.zeros((1, width), np.int32)
        x[0, :len(seq)] = seq
        steps.append(hf.ours(cfg, params, x)[0, len(seq) - 1])
        seq.append(int(np.argmax(steps[-1])))
        if seq[-1] == eos:
            break
    return seq, steps


def _check_generation(hf, cfg, params, out, prompt_text, prompt_ids, eos, decode):
    """transformers' text-generation pipeline (greedy) == the jaxctx greedy loop: token ids, text, and the logits of
    every step (generate's raw logits), so a wrong weight fails even when the greedy choice happens to agree."""
    import torch
    from transformers import pipeline

    want, logits = _greedy(hf, cfg, params, prompt_ids, NEW_TOKENS, eos)
    pipe = pipeline("text-generation", model=out)
    ids = pipe(prompt_text, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    text = pipe(prompt_text, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    print(f"{cfg.model.family}: pipeline {list(ids)[len(prompt_ids):]} == jaxctx greedy {want[len(prompt_ids):]}")
    assert list(ids) == want and len(want) > len(prompt_ids)
    assert text == decode(want)
    gen = pipe.model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    theirs = np.stack([step[0].float().numpy() for step in gen.logits])
    assert theirs.shape == np.shape(logits) and np.abs(theirs - np.stack(logits)).max() < hf.TOL


# ----------------------------------------------------------------------------------------------------------
# The byte tokenizer as a Hugging Face tokenizer
# ----------------------------------------------------------------------------------------------------------

def test_byte_tokenizer_encodes_and_decodes_as_jaxctx(tmp_path):
    from transformers import AutoTokenizer

    from jaxctx.convert.tokenizer_files import write_byte_tokenizer

    write_byte_tokenizer(str(tmp_path), model_max_length=128)
    tok, ours = AutoTokenizer.from_pretrained(str(tmp_path)), ByteTokenizer()
    assert len(tok) == ours.vocab_size and tok.model_max_length == 128
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 6)
    for text in TEXTS:
        ids = tok(text)["input_ids"]  # default call: nothing added (jaxctx adds no specials either)
        assert ids == ours.encode_batch([text])[0].tolist(), text
        assert tok.decode(ids) == ours.decode(ids) == text
    # Every byte id, in a random order: invalid UTF-8 decodes to the same U+FFFD replacements.
    ids = (np.random.default_rng(0).permutation(256) + 7).tolist()
    assert tok.decode(ids) == ours.decode(ids)
    # Ids past the vocabulary (model.vocab_size=512 > 263 ids) decode to nothing on both sides.
    assert tok.decode([ord("a") + 7, 263, 300, 511]) == ours.decode([ord("a") + 7, 263, 300, 511]) == "a"
    # Special ids carry no text in jaxctx: skip_special_tokens gives the same string.
    with_specials = [1] + ours.encode_batch(["a é"])[0].tolist() + [2, 0, 0]
    assert tok.decode(with_specials, skip_special_tokens=True) == ours.decode(with_specials) == "a é"
    assert tok.decode(with_specials) == "<bos>a é<eos><pad><pad>"
    # Special tokens written in the text: transformers matches them (fill-mask needs "<mask>"); with
    # split_special_tokens=True they are plain bytes, exactly as ByteTokenizer encodes them.
    assert tok("x<mask>")["input_ids"] == [ord("x") + 7, 6]
    split = AutoTokenizer.from_pretrained(str(tmp_path), split_special_tokens=True)
    assert split("x<mask><eos>")["input_ids"] == ours.encode_batch(["x<mask><eos>"])[0].tolist()


# ----------------------------------------------------------------------------------------------------------
# A model trained with the byte tokenizer
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains a model once per module (~25 s on 2 cores)
def test_byte_model_export_works_in_transformers(hf, byte_run):
    from transformers import AutoTokenizer, GenerationConfig

    cfg, workdir, out = byte_run
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok(t)["input_ids"] for t in TEXTS] == [ids.tolist() for ids in ByteTokenizer().encode_batch(TEXTS)]

    params, _ = load_params(workdir)
    prompt = ByteTokenizer().encode_batch([PROMPT])[0].tolist()
    _check_generation(hf, cfg, params, out, PROMPT, prompt, eos=2, decode=ByteTokenizer().decode)

    card = open(os.path.join(out, "README.md")).read()
    last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
    assert f"Last logged training loss: {last['loss']:.4f} at step 3" in card
    assert "Steps: 3" in card and "data.source=stdlib (max_documents=20)" in card
    assert "Validation perplexity: not recorded" in card and "pipeline_tag: text-generation" in card
    assert config_lib.to_yaml(cfg) in card  # the full config, as the workdir recorded it


def test_model_card_shows_the_validation_the_loop_printed(tmp_path, capsys):
    """The loop records its validation pass in metrics.jsonl; the export's card quotes that row."""
    import re

    _train(tmp_path / "work", ["data.validation_fraction=0.2", "train.eval_batches=1"])
    printed = re.search(r"validation at step 3: loss (\S+)  perplexity (\S+)", capsys.readouterr().err)
    assert printed, "the loop printed no validation line"
    out = _export(tmp_path / "work", tmp_path / "hf")
    card = open(os.path.join(out, "README.md")).read()
    shown = re.search(r"Validation: val_loss (\S+), val_perplexity (\S+) at step 3 \(metrics.jsonl\)", card)
    assert shown, card
    assert f"{float(shown.group(1)):.4f}" == printed.group(1)
    assert f"{float(shown.group(2)):.2f}" == printed.group(2)
    assert float(shown.group(2)) == pytest.approx(np.exp(float(shown.group(1))), rel=1e-3)


def test_model_card_reports_only_recorded_values():
    from jaxctx.convert.model_card import model_card

    cfg = config_lib.load(TINY, FAST)
    rows = [{"step": 3, "loss": 5.5}, {"step": 3, "val_loss": 2.0, "val_perplexity": 7.389}]
    card = model_card(cfg, name="m", step=3, source="/w", meta={}, metrics=rows, tokenizer="byte", params=10)
    assert "Validation: val_loss 2.0000, val_perplexity 7.3890 at step 3" in card
    card = model_card(cfg, name="m", step=3, source="/w", meta={}, metrics=[], tokenizer=None, params=10)
    assert "Training loss: not recorded" in card and "Validation perplexity: not recorded" in card
    assert "Tokenizer: none found" in card


# ----------------------------------------------------------------------------------------------------------
# A model trained with a BPE from `jaxctx tokenizer train`
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains a model once per module (~25 s on 2 cores)
def test_bpe_model_export_works_in_transformers(hf, bpe_run):
    from transformers import AutoTokenizer

    cfg, workdir, out, tok_dir = bpe_run
    for name in os.listdir(tok_dir):  # copied as it is
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(tok_dir, name), "rb").read(), name
    ours, theirs = load_tokenizer(tok_dir), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = ours.encode_batch([text])[0].tolist()
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids) == ours.decode(ids) == text
    config = json.loads(open(os.path.join(out, "config.json")).read())
    generation = json.loads(open(os.path.join(out, "generation_config.json")).read())
    special = ours.special
    assert {k: config[k] for k in generation} == generation == {
        "bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": special.pad}

    params, _ = load_params(workdir)
    prompt = ours.encode_batch([PROMPT])[0].tolist()
    _check_generation(hf, cfg, params, out, PROMPT, prompt, eos=special.eos,
                      decode=lambda ids: theirs.decode(ids, skip_special_tokens=True))


@pytest.mark.slow  # trains a model once per module (~25 s on 2 cores)
def test_moved_tokenizer_is_a_clear_error_and_tokenizer_flag_supplies_it(bpe_run, tmp_path, capsys):
    _, workdir, _, tok_dir = bpe_run
    moved = str(tmp_path / "moved-bpe")
    shutil.move(tok_dir, moved)
    try:
        assert main(["convert", "to-hf", workdir, str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("jaxctx convert: error:"), err
        assert f"data.tokenizer={tok_dir}, which does not exist" in err and "--tokenizer DIR" in err
        assert not (tmp_path / "a").exists()
        assert main(["convert", "to-hf", workdir, str(tmp_path / "b"), "--tokenizer", str(tmp_path / "nope")]) == 2
        assert f"--tokenizer {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
        assert main(["convert", "to-hf", workdir, str(tmp_path / "c"), "--tokenizer", moved]) == 0
        assert f"tokenizer: {moved}" in capsys.readouterr().out
        assert (open(tmp_path / "c" / "tokenizer.json", "rb").read()
                == open(os.path.join(moved, "tokenizer.json"), "rb").read())
    finally:
        shutil.move(moved, tok_dir)


# ----------------------------------------------------------------------------------------------------------
# BERT: fill-mask
# ----------------------------------------------------------------------------------------------------------

def test_bert_fill_mask_pipeline_matches_jaxctx(hf, tmp_path):
    from transformers import pipeline

    cfg = config_lib.load(None, ["model.family=bert", "model.num_layers=2", "model.d_model=48", "model.num_heads=6",
                                 "data.seq_len=32"])
    params = hf.jaxctx_params(cfg)
    save_params(str(tmp_path / "ckpt"), params, {"config": cfg.to_dict(), "step": 0})
    out = _export(tmp_path / "ckpt", tmp_path / "hf")
    assert "generation_config.json" not in os.listdir(out)  # not a causal LM
    assert json.loads(open(os.path.join(out, "config.json")).read())["pad_token_id"] == 0

    pipe = pipeline("fill-mask", model=out, top_k=5)
    got = pipe(f"def ma{pipe.tokenizer.mask_token}n(): pass")
    byte = ByteTokenizer()
    ids = byte.encode_batch(["def ma"])[0].tolist() + [6] + byte.encode_batch(["n(): pass"])[0].tolist()
    logits = hf.ours(cfg, params, np.asarray([ids], np.int32))[0, 6]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    assert [row["token"] for row in got] == top.tolist()
    np.testing.assert_allclose([row["score"] for row in got], probs[top], rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# from-hf -> to-hf keeps the model's own tokenizer and generation config
# ----------------------------------------------------------------------------------------------------------

def test_from_hf_round_trip_keeps_tokenizer_files(hf, tmp_path):
    from transformers import AutoTokenizer

    from jaxctx.data.bpe import train_bpe

    src = hf.save(hf.model("gpt2", vocab_size=300, bos_token_id=1, eos_token_id=2), tmp_path / "src")
    train_bpe([TEXTS * 20], 300, src)
    files = sorted(os.listdir(src))
    assert "generation_config.json" in files and "tokenizer.json" in files
    assert main(["convert", "from-hf", src, str(tmp_path / "ckpt")]) == 0
    out = _export(tmp_path / "ckpt", tmp_path / "hf")
    for name in files:  # tokenizer files and generation_config.json byte for byte (tensors: test_convert_io.py)
        if name not in ("model.safetensors", "config.json"):
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)  # the tokenizer's
    source, exported = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert [source(t)["input_ids"] for t in TEXTS] == [exported(t)["input_ids"] for t in TEXTS]
    card = open(os.path.join(out, "README.md")).read()
    assert f"converted from the Hugging Face directory `{src}`" in card


def test_a_tokenizer_too_large_for_the_model_is_refused(saved, tmp_path, capsys):
    _, path = saved("gpt2")  # vocab 101, no tokenizer files
    assert main(["convert", "from-hf", path, str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()  # the fixture's save_pretrained progress bars
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer byte has 263 ids but the model has model.vocab_size=101" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()
