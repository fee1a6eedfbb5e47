"""`jaxctx bench train` at tiny sizes: FLOP convention, batch scaling, the real step's compiled memory, the HF
side-by-side, output files and input errors. Timings are never asserted, only their consistency."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta

from jaxctx import config as config_lib
from jaxctx import models
from jaxctx.bench.flops import matmul_param_count, train_flops_per_token
from jaxctx.bench.machine import device_peak, known_peak_tflops
from jaxctx.bench.train import TrainBenchConfig, batch_for, variants
from jaxctx.bench.trainstep import config_at, synthetic_batch
from jaxctx.cli import main

TINY = "configs/tiny.yaml"  # gpt2, 2 layers x 64, 2 heads, vocab 512
FAST = ["--devices", "1", "--repeats", "1", "--warmup", "1", "--matmul-size", "64"]


# ----------------------------------------------------------------------------------------------------------
# Conventions (pure)
# ----------------------------------------------------------------------------------------------------------

def test_train_flops_per_token_is_palm_with_causal_halved():
    n, L, H, Q, T = 1_000_000, 6, 8, 64, 4096
    full = train_flops_per_token(n, num_layers=L, heads=H, head_dim=Q, seq_len=T, causal=False)
    assert full["dense"] == 6 * n
    assert full["attention"] == 12 * L * H * Q * T
    assert full["total"] == 6 * n + 12 * L * H * Q * T
    causal = train_flops_per_token(n, num_layers=L, heads=H, head_dim=Q, seq_len=T, causal=True)
    assert causal["attention"] == full["attention"] / 2 and causal["dense"] == full["dense"]
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        train_flops_per_token(n, num_layers=L, heads=H, head_dim=Q, seq_len=0, causal=True)


def test_matmul_params_exclude_lookup_tables_and_count_the_tied_head_once():
    cfg = config_lib.load(TINY)
    m = cfg.model
    variables = jax.eval_shape(lambda: models.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    params = meta.unbox(variables["params"])
    counts = matmul_param_count(params, vocab_size=m.vocab_size, d_model=m.d_model, tied=True)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    tables = m.vocab_size * m.d_model + m.max_positions * m.d_model  # token + position embeddings
    assert counts["total"] == total and counts["embedding"] == tables
    assert counts["matmul"] == total - tables + m.vocab_size * m.d_model
    untied = matmul_param_count(params, vocab_size=m.vocab_size, d_model=m.d_model, tied=False)
    assert untied["matmul"] == total - tables


def test_known_peaks_and_cpu_peak_is_the_measured_matmul():
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert known_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0  # more specific key wins
    assert known_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert known_peak_tflops("Some Future Chip", "bfloat16") is None
    gpu = device_peak("bfloat16", backend="gpu", device_kind="NVIDIA A100-SXM4-80GB")
    assert gpu["tflop_per_s"] == 312.0 and "data-sheet" in gpu["source"]
    matmul = {"n": 64, "dtype": "float32", "gflop_per_s": 50.0}
    cpu = device_peak("float32", matmul, backend="cpu", device_kind="cpu")
    assert cpu["tflop_per_s"] == 0.05 and "measured in this run" in cpu["source"]
    unknown = device_peak("bfloat16", matmul, backend="gpu", device_kind="Some Future Chip")
    assert unknown["tflop_per_s"] == 0.05 and "not in PEAK_TFLOPS" in unknown["source"]
    matmul["best_gflop_per_s"] = 60.0  # the peak is the fastest matmul call, not the median
    assert device_peak("float32", matmul, backend="cpu", device_kind="cpu")["tflop_per_s"] == 0.06


def test_batch_scales_to_hold_tokens_per_step_constant():
    base = config_lib.load(TINY)
    cfg = TrainBenchConfig(config=TINY, seq_lens=(32, 64, 128)).validated()
    assert [batch_for(cfg, base, t, 1) for t in (32, 64, 128)] == [4, 2, 1]  # default: longest T x 1 device
    assert [batch_for(cfg, base, t, 2) for t in (32, 64, 128)] == [8, 4, 2]  # ... x data-parallel size
    fixed = TrainBenchConfig(config=TINY, seq_lens=(32, 64), batch=3).validated()
    assert [batch_for(fixed, base, t, 1) for t in (32, 64)] == [3, 3]
    with pytest.raises(ValueError, match="not a multiple of T=48"):
        batch_for(TrainBenchConfig(config=TINY, seq_lens=(48,), tokens_per_step=100).validated(), base, 48, 1)
    with pytest.raises(ValueError, match="divisible by data-parallel size 2"):
        batch_for(fixed, base, 32, 2)


def test_config_at_sizes_positions_and_clamps_chunks():
    base = config_lib.load(TINY, ["model.mlp_chunk=64", "model.attention_block_q=64"])
    cfg = config_at(base, seq_len=32, batch=2, model={"remat_policy": "full"})
    assert (cfg.data.seq_len, cfg.train.batch_size, cfg.model.max_positions) == (32, 2, 32)
    assert cfg.model.mlp_chunk == 32 and cfg.model.attention_block_q == 32 and cfg.model.remat_policy == "full"
    batch = synthetic_batch(cfg)
    assert set(batch) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (2, 32) for v in batch.values())
    assert (batch["targets"][:, :-1] == batch["input_ids"][:, 1:]).all()  # next-token targets
    assert (batch["segment_ids"] == 1).all() and batch["loss_mask"].dtype.name == "float32"


def test_sweep_variants_are_the_product_of_block_sizes_and_remat_policies():
    cfg = TrainBenchConfig(config=TINY, seq_lens=(64,), block_sizes=(16, 32), remat_policies=("none", "full"))
    labels = [label for label, _ in variants(cfg.validated())]
    assert labels == ["block=16 remat=none", "block=16 remat=full", "block=32 remat=none", "block=32 remat=full"]
    assert variants(TrainBenchConfig(config=TINY, seq_lens=(64,)))[0] == ("jaxctx", {})


# ----------------------------------------------------------------------------------------------------------
# End to end through the CLI, with the HF baseline
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train.json"
    rc = main(["bench", "train", "--config", TINY, "--seq-lens", "64,32", "--compare-hf", "--out", str(out),
               "--trace", str(out.parent / "trace"), "--trace-steps", "1", *FAST])
    return rc, out


def test_cli_writes_json_csv_png(sweep):
    rc, out = sweep
    assert rc == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert result["bench"] == "train" and result["complete"] is True
    assert {"backend", "device_kind", "device_count", "jax_version", "cpu_model"} <= set(result["machine"])
    assert "6*N + 12*L*H*Q*T" in result["flop_convention"] and "halved" in result["flop_convention"]
    assert result["peak"]["tflop_per_s"] > 0 and result["matmul"]["n"] == 64
    assert [(r["impl"], r["seq_len"]) for r in result["rows"]] == [
        ("jaxctx", 32), ("jaxctx", 64), ("hf-torch", 32), ("hf-torch", 64)]
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "machine_cpu_model" in rows[0] and "mfu" in rows[0]


def test_rows_hold_constant_tokens_and_consistent_numbers(sweep):
    _, out = sweep
    result = json.loads(out.read_text())
    ours = [r for r in result["rows"] if r["impl"] == "jaxctx"]
    cfg = config_lib.load(TINY)
    for row in ours:
        assert row["status"] == "ok", row
        assert row["tokens_per_step"] == 64 and row["batch"] * row["seq_len"] == 64
        flops = train_flops_per_token(row["params_matmul"], num_layers=2, heads=2, head_dim=32,
                                      seq_len=row["seq_len"], causal=True)
        assert row["flops_per_token"] == pytest.approx(flops["total"], rel=1e-4)
        assert row["tokens_per_s"] == pytest.approx(64 / (row["step_ms"] / 1e3), rel=1e-3)
        assert row["mfu"] == pytest.approx(row["achieved_tflop_per_s"] / result["peak"]["tflop_per_s"], rel=1e-3)
        assert result["peak"]["total_tflop_per_s"] == pytest.approx(result["peak"]["tflop_per_s"], rel=1e-3)
        # Compiled memory: total = arguments + outputs - aliased (donated state) + temp.
        total = row["argument_mib"] + row["output_mib"] - row["alias_mib"] + row["temp_mib"]
        assert row["total_mib"] == pytest.approx(total, rel=1e-3)
        assert row["alias_mib"] > 0  # the state is donated
        params_mib = row["params_total"] * 4 / 2 ** 20  # float32 params: at least params + 2 AdamW moments
        assert row["argument_mib"] >= 3 * params_mib
        assert math.isfinite(row["loss"]) and row["loss"] == pytest.approx(math.log(cfg.model.vocab_size), rel=0.1)
        assert row["speedup_vs_hf"] == pytest.approx(row["tokens_per_s"] / row["hf_tokens_per_s"], rel=1e-3)
    # Learned positions are sized to T, so N is the same at every length and memory grows with T.
    assert ours[0]["params_matmul"] == ours[1]["params_matmul"]
    assert ours[1]["params_total"] > ours[0]["params_total"]
    hf = [r for r in result["rows"] if r["impl"] == "hf-torch"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["attention"] == "sdpa" for r in hf)
    assert hf[0]["hf"]["attn_implementation"] == "sdpa"
    assert hf[0]["params_total"] == ours[0]["params_total"]  # same model: HF GPT2 has the same parameters
    assert set(result["summary"]["jaxctx"]["speedup_vs_hf"]) == {"32", "64"}


def test_trace_captures_a_profile_per_configuration(sweep):
    _, out = sweep
    result = json.loads(out.read_text())
    for row in (r for r in result["rows"] if r["impl"] == "jaxctx"):
        assert row["trace"].endswith(f"jaxctx-T{row['seq_len']}")
        files = [p.name for p in pathlib.Path(row["trace"]).rglob("*") if p.is_file()]
        assert any(name.endswith(".xplane.pb") for name in files), files


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit code 2, nothing run
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "64,0"], "--seq-lens: 0 is not positive"),
    (["--seq-lens", "-64"], "--seq-lens: -64 is not positive"),
    (["--seq-lens", "sixty"], "--seq-lens: 'sixty' is not an integer"),
    (["--seq-lens", "64", "--remat-policies", "some"], "unknown policy 'some'"),
    (["--seq-lens", "64", "--block-sizes", "0"], "--block-sizes: 0 is not positive"),
    (["--seq-lens", "48,64", "--tokens-per-step", "64"], "not a multiple of T=48"),
    (["--seq-lens", "64", "--set", "model.attention=flash"], "model.attention='flash' is not one of"),
    (["--seq-lens", "64", "--set", "model.family=bert", "--compare-hf"], "needs model.family=gpt2"),
    (["--seq-lens", "64", "--devices", "99"], "--devices must be between 1 and"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(["bench", "train", "--config", TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tokens_per_step_and_batch_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--config", TINY, "--seq-lens", "64", "--batch", "1", "--tokens-per-step", "64"])
    assert "not allowed with argument" in capsys.readouterr().err
