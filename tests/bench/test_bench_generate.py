"""`jaxctx bench generate`: the rows hold what the columns say, against the wall clock and each other."""

import json
import time

from jaxctx import cli

TINY = ["--set", "model.num_layers=1", "--set", "model.d_model=32", "--set", "model.num_heads=2",
        "--set", "model.vocab_size=300"]


def test_bench_generate_rows_and_files(tmp_path, capsys):
    out = tmp_path / "gen.json"
    start = time.perf_counter()
    assert cli.main(["bench", "generate", *TINY, "--batches", "2", "--prompts", "24", "--new-tokens", "40",
                     "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == ["jaxctx", "transformers"]
    timed = 0.0
    for row in result["rows"]:
        assert (row["batch"], row["prompt"], row["new_tokens"]) == (2, 24, 40)
        assert row["prefill_tokens_per_s"] == 2 * 24 / row["prefill_s"]
        assert abs(row["decode_s"] - (row["total_s"] - row["prefill_s"])) < 1e-12
        if row["decode_tokens_per_s"] is not None:
            assert abs(row["decode_tokens_per_s"] * row["decode_s"] - 2 * 39) < 1e-6
        timed += row["prefill_s"] + row["total_s"]
    assert timed < wall  # each side timed at least once inside the command's own run
    ours = result["rows"][0]
    assert ours["compile_s"] > 0 and ours["prompt_bucket"] == 32
    assert "decode tok/s" in capsys.readouterr().out
    assert out.with_suffix(".csv").exists() and out.with_suffix(".png").exists()


def test_bench_generate_bad_input(capsys):
    assert cli.main(["bench", "generate", "--set", "model.family=llama", "--prompts", "16"]) == 2
    assert "model.family=gpt2" in capsys.readouterr().err
    assert cli.main(["bench", "generate", *TINY, "--prompts", "16", "--new-tokens", "1"]) == 2
    assert "--new-tokens 1" in capsys.readouterr().err
