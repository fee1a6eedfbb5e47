"""Evaluation: perplexity equal to transformers' sliding-window recipe, the per-position curve equal to a direct
computation, passkey prompts that hold what they claim, fill-mask equal to transformers' pipeline, and the CLIs."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxctx.convert.api import from_hf  # noqa: E402
from jaxctx.data.tokenizer import ByteTokenizer  # noqa: E402
from jaxctx.evaluate import passkey  # noqa: E402
from jaxctx.evaluate.perplexity import evaluate_stream, position_buckets, sliding_windows  # noqa: E402
from jaxctx.models import build  # noqa: E402


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 with the byte tokenizer's vocabulary: (torch model, HF dir)."""
    import torch
    import transformers as T

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=263, n_positions=160,
                                           bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(path))
    return model, str(path)


def hf_sliding_window_perplexity(model, ids: np.ndarray, seq_len: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide (fixed-length models) written out with torch: its windows and labels
    (-100 on context), the loss summed per labelled token (the guide weights the window mean by labels - 1,
    one token off when stride < seq_len). -> (perplexity, tokens scored)."""
    import torch

    encodings = torch.as_tensor(ids[None], dtype=torch.long)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, encodings.size(1), stride):
        end = min(begin + seq_len, encodings.size(1))
        trg_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits[:, :-1]
        labels = target_ids[:, 1:]  # the shift inside transformers' causal-LM loss
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=-100, reduction="none")
        nll_sum += losses.sum().item()
        n_tokens += int((labels != -100).sum())
        prev_end = end
        if end == encodings.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 16), (40, 24)])
def test_perplexity_equals_transformers_recipe(gpt2, seq_len, stride):
    model, path = gpt2
    cfg, params = from_hf(path)
    ids = np.random.default_rng(1).integers(7, 263, 301).astype(np.int32)
    ours = evaluate_stream(build(cfg), params, ids, seq_len, stride, batch_size=3)
    theirs, scored = hf_sliding_window_perplexity(model, ids, seq_len, stride)
    assert ours.perplexity == pytest.approx(theirs, rel=1e-5)
    assert ours.tokens_scored == scored


def test_windows_score_each_target_at_most_once_with_the_promised_context():
    for n, t, s in [(301, 64, 16), (64, 64, 64), (65, 64, 7), (10, 64, 3), (1000, 100, 100)]:
        windows = sliding_windows(n, t, s)
        scored = []
        for w in windows:
            targets = list(range(max(w.score_from, w.begin + 1), w.end))
            assert all(j - w.begin >= min(t - s, j) for j in targets)  # context >= T - S (or all before it)
            scored += targets
        assert windows[-1].end == n and scored == sorted(set(scored))
        unscored = set(range(1, n)) - set(scored)  # stride == T: each later window's first token only
        assert unscored == ({w.begin for w in windows[1:]} if s == t else set()), (n, t, s)
    assert position_buckets(64) == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]
    assert position_buckets(40)[-1] == (32, 40)


def test_per_position_curve_equals_direct_losses(gpt2):
    import jax

    _, path = gpt2
    cfg, params = from_hf(path)
    model = build(cfg)
    ids = np.random.default_rng(2).integers(7, 263, 4 * 32).astype(np.int32)
    result = evaluate_stream(model, params, ids, 32, 32, batch_size=4)
    logits = np.asarray(model.apply({"params": params}, ids.reshape(4, 32)), np.float64)  # [4, 32, V]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = ids.reshape(4, 32)[:, 1:]
    direct = -np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]  # [4, 31]: context j+1
    for row in result.per_position:
        lo, hi = row["context_from"], row["context_to"]
        assert row["tokens"] == 4 * (hi - lo + 1)
        assert row["mean_loss"] == pytest.approx(direct[:, lo - 1:hi].mean(), rel=1e-5)
    assert jax.numpy.isfinite(result.mean_loss)


def test_eval_command_writes_what_it_prints(gpt2, tmp_path, capsys):
    from jaxctx import cli

    _, path = gpt2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 12)
    out = tmp_path / "ev.json"
    argv = ["eval", "--hf", path, "--tokenizer", "byte", "--data", str(corpus), "--seq-len", "64", "--stride",
            "32", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"perplexity {result['perplexity']:.4f}" in printed
    ids = np.concatenate([ByteTokenizer().encode_batch([corpus.read_text()])[0], [2]])  # one document + EOS
    cfg, params = from_hf(path)
    direct = evaluate_stream(build(cfg), params, ids, 64, 32)
    assert result["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert result["tokens_scored"] == direct.tokens_scored == ids.size - 1  # stride < seq_len: every target
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("context_from,context_to,mean_loss")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(argv) == 2  # the result exists: kept unless --force
    assert "exists" in capsys.readouterr().err


def test_eval_compare_draws_earlier_curves(gpt2, tmp_path, capsys, monkeypatch):
    from jaxctx import cli
    from jaxctx.evaluate import plots

    _, path = gpt2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("import os\nprint(os.sep)\n" * 8)
    base = ["eval", "--hf", path, "--tokenizer", "byte", "--data", str(corpus), "--seq-len", "32"]
    assert cli.main(base + ["--out", str(tmp_path / "a.json")]) == 0
    drawn = {}
    real = plots.plot_position_loss
    monkeypatch.setattr(plots, "plot_position_loss", lambda p, curves, title: (drawn.update(curves),
                                                                               real(p, curves, title)))
    assert cli.main(base + ["--out", str(tmp_path / "b.json"), "--compare", f"before={tmp_path / 'a.json'}",
                            "--compare", str(tmp_path / "a.json"), "--label", "after"]) == 0
    assert list(drawn) == ["before", "a", "after"]  # earlier curves first, this run last
    assert drawn["before"] == json.loads((tmp_path / "a.json").read_text())["rows"] == drawn["after"]
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    (tmp_path / "bad.json").write_text('{"kind": "passkey", "rows": []}')
    for extra, message in ((["--compare", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c.json")],
                            "is not the JSON of `jaxctx eval --out`"),
                           (["--compare", str(tmp_path / "none.json"), "--out", str(tmp_path / "c.json")],
                            "cannot read"),
                           (["--label", "x"], "pass --out FILE.json too")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c.json").exists()


def test_passkey_prompts_hold_the_key_at_the_depth():
    tok = ByteTokenizer()

    def encode(text):
        return tok.encode_batch([text])[0]

    prompts = passkey.make_prompts(encode, [300, 1000], [0.0, 0.5, 1.0], trials=2, seed=7)
    again = passkey.make_prompts(encode, [300, 1000], [0.0, 0.5, 1.0], trials=2, seed=7)
    assert [(p.key, p.ids.tolist()) for p in prompts] == [(p.key, p.ids.tolist()) for p in again]
    filler = len(encode(passkey.FILLER))
    for p in prompts:
        text = tok.decode(p.ids)
        assert p.length - filler < len(p.ids) <= p.length
        assert text.endswith(passkey.QUESTION)
        assert tok.decode(p.ids[p.needle_at:]).startswith(passkey.needle(p.key))
        assert text.count(p.key) == 2 and len(p.key) == 5
        body = len(p.ids) - len(encode(passkey.needle(p.key))) - len(encode(passkey.QUESTION))
        assert abs(p.needle_at - p.depth * body) <= filler
    assert passkey.is_retrieved(" 12345. Remember", "12345") and not passkey.is_retrieved(" 1234", "12345")
    table = passkey.accuracy_table(prompts[:2], [" " + prompts[0].key, " nothing"])
    assert table == [{"length": 300, "depth": 0.0, "trials": 2, "correct": 1, "accuracy": 0.5}]


def test_passkey_command(gpt2, tmp_path, capsys):
    from jaxctx import cli

    _, path = gpt2
    out = tmp_path / "pk.json"
    assert cli.main(["eval", "passkey", "--hf", path, "--tokenizer", "byte", "--lengths", "110,140", "--depths",
                     "0,1", "--trials", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["length"], r["depth"], r["trials"]) for r in result["rows"]] == [
        (110, 0.0, 2), (110, 1.0, 2), (140, 0.0, 2), (140, 1.0, 2)]
    assert f"passkey accuracy {result['accuracy']:.1%}" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["eval", "passkey", "--hf", path, "--tokenizer", "byte", "--lengths", "500"]) == 2
    assert "max_positions=160" in capsys.readouterr().err


def test_fill_mask_equals_transformers_pipeline(tmp_path, capsys):
    import torch
    import transformers as T

    from jaxctx import cli

    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "small", "red", "house", "."]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = T.BertTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = T.BertForMaskedLM(T.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                           intermediate_size=48, vocab_size=len(vocab),
                                           max_position_embeddings=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    text = "the cat [MASK] on the [MASK] ."
    theirs = T.pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), top_k=4)(text)
    assert cli.main(["fill-mask", "--hf", str(tmp_path), "--text", text, "--top-k", "4", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs):
        assert [c["token"] for c in mine] == [c["token"] for c in reference]
        assert [c["token_str"] for c in mine] == [c["token_str"] for c in reference]
        np.testing.assert_allclose([c["score"] for c in mine], [c["score"] for c in reference], rtol=1e-4)
    assert cli.main(["fill-mask", "--hf", str(tmp_path), "--text", "no mask here"]) == 2
    assert "[MASK]" in capsys.readouterr().err
