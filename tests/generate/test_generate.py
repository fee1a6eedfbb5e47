"""KV-cache decoding: token-for-token parity with transformers' generate, cache vs full recomputation, ragged
batches, bounded compilation, sampling, end tokens, and the `jaxctx generate` command.

The models are tiny random transformers models with every parameter perturbed (so the greedy path is not a
constant), converted with `jaxctx.convert.from_hf`; f32 on CPU.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxctx.convert.api import from_hf  # noqa: E402
from jaxctx.generate import GenerateError, GenerationSettings, Generator  # noqa: E402
from jaxctx.generate import decoder, processors  # noqa: E402
from jaxctx.models import build  # noqa: E402

VOCAB = 101
HF_CONFIGS = {
    "gpt2": dict(n_embd=48, n_head=6, n_layer=2, vocab_size=VOCAB, n_positions=96, bos_token_id=0, eos_token_id=0),
    # GQA (6 query heads on 2 kv heads), an untied head, linear RoPE scaling
    "llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_hidden_layers=2,
                  vocab_size=VOCAB, intermediate_size=72, max_position_embeddings=96, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
                   vocab_size=VOCAB, intermediate_size=72, max_position_embeddings=96, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_model(name: str, path, scale: float = 0.5):
    import torch
    import transformers as T

    gpt2 = name.startswith("gpt2")
    cls = (T.GPT2Config, T.GPT2LMHeadModel) if gpt2 else (T.LlamaConfig, T.LlamaForCausalLM)
    torch.manual_seed(0)
    model = cls[1](cls[0](**HF_CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (transformers model, our Generator) with the same weights, built on first use. One Generator per
    family keeps its compiled loops, so tests with equal shapes and compile keys share them."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            model = hf_model(name, path)
            cfg, params = from_hf(str(path))
            cache[name] = model, Generator(cfg, params)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pair(pairs):
    return pairs("gpt2")


def prompt_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, n).astype(np.int32)


def hf_generate(model, prompt, eos=None, **kwargs) -> list[int]:
    import torch

    eos = model.config.eos_token_id if eos is None else eos
    out = model.generate(torch.as_tensor(prompt[None]), do_sample=False, pad_token_id=eos, eos_token_id=eos,
                         **kwargs)
    return out[0, len(prompt):].tolist()


def settings_for(model, **kwargs) -> GenerationSettings:
    eos = model.config.eos_token_id
    return GenerationSettings(eos_ids=(eos,), pad_id=eos, **kwargs)


STRATEGIES = {"greedy": dict(), "repetition-penalty": dict(repetition_penalty=1.5), "beam3": dict(num_beams=3),
              "beam4-lp0.5-early": dict(num_beams=4, length_penalty=0.5, early_stopping=True)}
PARITY = [("gpt2", name) for name in STRATEGIES] + [("llama", "greedy"), ("llama", "beam3"),
                                                    ("llama3", "greedy"), ("llama3", "repetition-penalty")]
NEW = 16  # max_new_tokens of most tests: one compile key per strategy


@pytest.mark.parametrize("family,strategy", PARITY, ids=[f"{f}-{s}" for f, s in PARITY])
def test_matches_transformers_generate(pairs, family, strategy):
    model, gen = pairs(family)
    prompt = prompt_ids(11)
    [ours] = gen.generate([prompt], settings_for(model, max_new_tokens=NEW, **STRATEGIES[strategy]))
    theirs = hf_generate(model, prompt, max_new_tokens=NEW, **STRATEGIES[strategy])
    assert list(ours.token_ids) == theirs
    ended = theirs and theirs[-1] == model.config.eos_token_id
    assert ours.finish_reason == ("eos" if ended else "length")


def test_beam_search_that_finishes_early_matches(pair):
    """EOS set to a token the model emits early, so hypotheses finish at different lengths (the finished-set
    bookkeeping, the early-stop heuristic and length penalties all come into play)."""
    model, gen = pair
    lengths = []
    for seed in range(2):
        prompt = prompt_ids(7, seed)
        eos = gen.generate([prompt], GenerationSettings(max_new_tokens=NEW))[0].token_ids[3]
        for strategy in (dict(num_beams=3), dict(num_beams=3, early_stopping="never", length_penalty=2.0),
                         dict(num_beams=2, early_stopping=True, length_penalty=-1.0)):
            [ours] = gen.generate([prompt], GenerationSettings(max_new_tokens=NEW, eos_ids=(eos,), pad_id=eos,
                                                               **strategy))
            theirs = hf_generate(model, prompt, max_new_tokens=NEW, eos=eos, **strategy)
            assert list(ours.token_ids) == theirs, strategy
            lengths.append(len(ours.token_ids))
    assert min(lengths) < NEW  # some search really ended on EOS before the limit


def test_cached_logits_equal_full_recomputation(tmp_path):
    """At every decode step, the cached step's logits equal the model run on the whole sequence (each row alone,
    unpadded: one full forward per row at the end gives every step's reference, the model being causal)."""
    hf_model("llama", tmp_path, scale=0.05)
    cfg, params = from_hf(str(tmp_path), scan_layers=False)  # the decoder runs the layers unrolled
    model = build(cfg)
    prompt, valid = decoder.left_pad([prompt_ids(5), prompt_ids(9, 1)], 16, pad_id=0)
    logits, cache = jax.jit(lambda ids, ok: decoder.prefill(model, params, ids, ok, 8))(prompt, valid)
    step = jax.jit(lambda tokens, cache, index: decoder.decode_step(model, params, tokens, cache, index))
    seqs = [list(prompt[r][valid[r]]) for r in range(2)]
    cached = [[], []]  # per row: the logits after each prefix
    for t in range(8):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        for r in range(2):
            cached[r].append(np.asarray(logits[r]))
            seqs[r].append(int(tokens[r]))
        logits, cache = step(tokens, cache, t)
    worst = 0.0
    for r, n in enumerate((5, 9)):
        full = np.asarray(model.apply({"params": params}, np.asarray([seqs[r]], np.int32)))[0]  # [n + 8, V]
        worst = max(worst, float(np.max(np.abs(np.stack(cached[r]) - full[n - 1:n + 7]))))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ragged_batch_equals_each_prompt_alone(pairs, family):
    model, gen = pairs(family)
    prompts = [prompt_ids(3, 1), prompt_ids(20, 2), prompt_ids(9, 3)]  # buckets 16, 32, 16
    settings = settings_for(model, max_new_tokens=NEW)
    together = gen.generate(prompts, settings)
    assert together == [gen.generate([p], settings)[0] for p in prompts]
    if family == "gpt2":
        beams = settings.replace(num_beams=3)
        assert gen.generate(prompts, beams) == [gen.generate([p], beams)[0] for p in prompts]


def test_compilation_is_bounded_by_buckets(tmp_path):
    hf_model("gpt2", tmp_path)
    cfg, params = from_hf(str(tmp_path))
    gen = Generator(cfg, params)
    settings = GenerationSettings(max_new_tokens=4)
    for n in range(1, 41, 2):  # 20 prompt lengths: buckets 16, 32, 64
        gen.generate([prompt_ids(n, n)], settings)
    assert gen.compiled_count == 3


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    model, gen = pair
    prompt = prompt_ids(6)
    sample = settings_for(model, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=40, seed=3)
    first, again = gen.generate([prompt], sample), gen.generate([prompt], sample)
    assert first == again
    others = {gen.generate([prompt], sample.replace(seed=s))[0].token_ids for s in range(4, 8)}
    assert len(others | {first[0].token_ids}) > 1  # a different seed draws differently
    compiled = gen.compiled_count
    greedy = gen.generate([prompt], settings_for(model, max_new_tokens=NEW))
    assert gen.generate([prompt], sample.replace(top_k=1, temperature=0.7)) == greedy
    assert gen.compiled_count <= compiled + 1  # seeds, temperature and k are traced: only greedy may compile


def test_processors_match_transformers():
    import torch
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, (4, 12))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    t_scores, t_ids = torch.as_tensor(scores), torch.as_tensor(ids)
    cases = [
        (processors.apply_repetition_penalty(jnp.asarray(scores), jnp.asarray(seen), 1.3),
         lp.RepetitionPenaltyLogitsProcessor(1.3)(t_ids, t_scores.clone())),
        (processors.top_k_filter(jnp.asarray(scores), 7), lp.TopKLogitsWarper(7)(t_ids, t_scores.clone())),
        (processors.top_p_filter(jnp.asarray(scores), 0.8), lp.TopPLogitsWarper(0.8)(t_ids, t_scores.clone())),
        (processors.top_p_filter(jnp.asarray(scores), 0.05), lp.TopPLogitsWarper(0.05)(t_ids, t_scores.clone())),
    ]
    for ours, theirs in cases:
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
        assert np.array_equal(np.isinf(np.asarray(ours)), np.isinf(theirs.numpy()))


def test_end_and_stop_tokens_end_rows(pair):
    model, gen = pair
    prompt = prompt_ids(8)
    free = gen.generate([prompt], settings_for(model, max_new_tokens=NEW))[0]
    assert free.finish_reason == "length", "pick a prompt whose greedy run does not emit EOS"
    third = free.token_ids[2]
    first_at = free.token_ids.index(third)
    [eos] = gen.generate([prompt], settings_for(model, max_new_tokens=NEW).replace(eos_ids=(third,)))
    assert eos.token_ids == free.token_ids[:first_at + 1] and eos.finish_reason == "eos"
    [stop] = gen.generate([prompt], settings_for(model, max_new_tokens=NEW, stop_ids=(third,)))
    assert stop.token_ids == free.token_ids[:first_at + 1] and stop.finish_reason == "stop"
    streamed = []
    gen.generate([prompt], settings_for(model, max_new_tokens=NEW), on_token=streamed.append)
    assert tuple(streamed) == free.token_ids


def test_bad_settings_and_prompts(pair):
    model, gen = pair
    with pytest.raises(GenerateError, match="top_p=0"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(GenerateError, match="num_beams=0"):
        GenerationSettings(num_beams=0)
    with pytest.raises(GenerateError, match="max_positions=96"):
        gen.generate([prompt_ids(90)], GenerationSettings(max_new_tokens=NEW))
    with pytest.raises(GenerateError, match="outside the model's vocabulary"):
        gen.generate([[VOCAB + 5]], GenerationSettings())
    truncating = Generator(gen.model_cfg, gen.params, truncate="left")
    long_prompt = prompt_ids(90)
    settings = settings_for(model, max_new_tokens=NEW)
    assert truncating.generate([long_prompt], settings) == gen.generate([long_prompt[-80:]], settings)


def test_generate_command(tmp_path, capsys):
    """The CLI end to end on a from-hf checkpoint with the byte tokenizer: streaming, JSONL in and out."""
    from jaxctx import cli
    from jaxctx.convert.api import import_checkpoint
    from jaxctx.data.tokenizer import ByteTokenizer

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    HF_CONFIGS["gpt2-bytes"] = dict(HF_CONFIGS["gpt2"], vocab_size=263, eos_token_id=2, bos_token_id=1)
    try:
        model = hf_model("gpt2-bytes", hf_dir)
    finally:
        del HF_CONFIGS["gpt2-bytes"]
    import_checkpoint(str(hf_dir), str(ckpt))
    tok = ByteTokenizer()
    prompt = "def f(x):"
    expected = hf_generate(model, tok.encode_batch([prompt])[0], max_new_tokens=12)
    args = ["generate", "--checkpoint", str(ckpt), "--tokenizer", "byte", "--max-new-tokens", "12"]
    assert cli.main(args + ["--prompt", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(expected) + "\n"
    assert "1 prompt(s)" in out.err
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n" + json.dumps({"prompt": "é"}) + "\n")
    result = tmp_path / "out.jsonl"
    assert cli.main(args + ["--prompts", str(tmp_path / "in.jsonl"), "--out", str(result)]) == 0
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [prompt, "é"]
    assert rows[0]["token_ids"] == expected and rows[0]["completion"] == tok.decode(expected)
    assert rows[1]["finish_reason"] in ("eos", "length") and len(rows[1]["token_ids"]) <= 12
    assert set(rows[0]) == {"prompt", "completion", "token_ids", "finish_reason"}
    capsys.readouterr()
    assert cli.main(args + ["--prompts", str(tmp_path / "in.jsonl"), "--num-beams", "2"]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == [prompt, "é"]
    # on a mesh (8 fake devices, params sharded as trained, the batch padded to 4 rows): the same stream
    assert cli.main(args + ["--prompt", prompt, "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert capsys.readouterr().out == tok.decode(expected) + "\n"
