"""`jaxctx bench attention` end to end at tiny sizes, plus its FLOP convention and its input errors.

Timings are never asserted (they depend on the machine and its load); FLOP counts, memory analysis and the
relations between reported fields are deterministic and are.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import jax
import pytest

from jaxctx.bench.attention import available_impls, check_impls
from jaxctx.bench.cli import parse_int_list
from jaxctx.bench.flops import attention_flops, matmul_flops
from jaxctx.bench.measure import MIB
from jaxctx.cli import main

TINY = ["--heads", "2", "--head-dim", "16", "--repeats", "1", "--warmup", "1", "--matmul-size", "128"]
PHASES = ("fwd", "fwd_bwd")
ROW_FIELDS = {"impl", "kernel", "seq_len", "batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "block_q",
              "block_k", "status"} | {f"{p}_{f}" for p in PHASES for f in (
                  "status", "gflop", "ms", "min_ms", "gflop_per_s", "matmul_fraction", "temp_bytes", "temp_mib",
                  "argument_mib", "output_mib", "compile_s", "tflop_per_s", "peak_fraction")}
MACHINE_FIELDS = {"backend", "device_kind", "device_count", "jax_version", "jaxlib_version", "cpu_model",
                  "cpu_count", "date"}


# ----------------------------------------------------------------------------------------------------------
# FLOP convention
# ----------------------------------------------------------------------------------------------------------

def test_attention_flops_convention():
    b, h, t, d = 2, 8, 1024, 64
    full = attention_flops(b, h, t, d, causal=False)
    assert full["fwd"] == 4 * b * h * t * t * d  # QK^T and PV, 2*T^2*D each per head
    assert full["bwd"] == 2.5 * full["fwd"]
    assert full["fwd_bwd"] == 3.5 * full["fwd"]
    causal = attention_flops(b, h, t, d, causal=True)
    assert {k: 2 * v for k, v in causal.items()} == full  # causal counts exactly half
    assert matmul_flops(2048) == 2 * 2048 ** 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_attention_flops_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="seq_len"):
        attention_flops(1, 8, bad, 64, causal=True)


# ----------------------------------------------------------------------------------------------------------
# End to end through the CLI
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "attention.json"
    rc = main(["bench", "attention", "--seq-lens", "128,64", "--impls", "reference,xla,blockwise",
               "--out", str(out), *TINY])
    return rc, out


def test_cli_writes_json_csv_png(sweep):
    rc, out = sweep
    assert rc == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert result["bench"] == "attention" and result["complete"] is True
    assert MACHINE_FIELDS <= set(result["machine"])
    assert result["machine"]["backend"] == jax.default_backend()
    assert "3.5" in result["flop_convention"] and "causal" in result["flop_convention"]
    assert result["matmul"]["n"] == 128 and result["matmul"]["gflop_per_s"] > 0
    assert result["memory_budget"]["bytes"] > 0
    # Sorted by T, then in --impls order.
    assert [(r["seq_len"], r["impl"]) for r in result["rows"]] == [
        (t, impl) for t in (64, 128) for impl in ("reference", "xla", "blockwise")]

    with open(out.with_suffix(".csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(int(r["seq_len"]), r["impl"]) for r in csv_rows] == [
        (r["seq_len"], r["impl"]) for r in result["rows"]]
    assert {f"machine_{k}" for k in MACHINE_FIELDS} <= set(csv_rows[0])  # a CSV alone names its machine


def test_cli_rows_have_sane_values(sweep):
    _, out = sweep
    result = json.loads(out.read_text())
    matmul_rate = result["matmul"]["gflop_per_s"]
    assert result["peak"]["tflop_per_s"] > 0 and "source" in result["peak"]
    for row in result["rows"]:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert "peak_device_mib" in row  # memory_stats() peak where the backend reports it (None on CPU)
        assert row["status"] == "ok", row
        assert (row["batch"], row["heads"], row["kv_heads"], row["head_dim"]) == (1, 2, 2, 16)
        assert row["causal"] is True and row["dtype"] == "float32"
        flops = attention_flops(1, 2, row["seq_len"], 16, causal=True)
        for phase in PHASES:
            assert row[f"{phase}_status"] == "ok"
            assert row[f"{phase}_gflop"] == pytest.approx(flops[phase] / 1e9)
            assert row[f"{phase}_ms"] > 0 and row[f"{phase}_min_ms"] > 0
            # Reported rates are consistent with the reported times and the matmul reference.
            rate = row[f"{phase}_gflop"] / (row[f"{phase}_ms"] / 1e3)
            assert row[f"{phase}_gflop_per_s"] == pytest.approx(rate, rel=1e-2)
            assert row[f"{phase}_matmul_fraction"] == pytest.approx(rate / matmul_rate, rel=1e-2)
            assert row[f"{phase}_tflop_per_s"] == pytest.approx(rate / 1e3, rel=1e-2)
            # Fraction of the device peak: on CPU the peak is the matmul measured in the same run.
            peak = result["peak"]["tflop_per_s"]
            assert row[f"{phase}_peak_fraction"] == pytest.approx(rate / 1e3 / peak, rel=1e-2)
            assert row[f"{phase}_temp_bytes"] >= 0
            assert row[f"{phase}_temp_mib"] == pytest.approx(row[f"{phase}_temp_bytes"] / MIB, rel=1e-4)
            assert row[f"{phase}_argument_mib"] > 0 and row[f"{phase}_output_mib"] > 0
        assert row["fwd_bwd_gflop"] == pytest.approx(3.5 * row["fwd_gflop"])
    # The reference kernel materialises [H, T, T] f32 scores: its memory shows it and grows with T.
    ref = {r["seq_len"]: r for r in result["rows"] if r["impl"] == "reference"}
    for t, row in ref.items():
        assert row["fwd_bwd_temp_bytes"] >= 2 * t * t * 4
    assert ref[128]["fwd_bwd_temp_bytes"] > ref[64]["fwd_bwd_temp_bytes"]


def test_cli_skips_configs_over_the_memory_budget(tmp_path, capsys):
    out = tmp_path / "skip.json"
    budget_gib = 1e-6  # ~1 KiB: every real configuration's temp memory exceeds it
    rc = main(["bench", "attention", "--seq-lens", "64", "--impls", "reference,blockwise",
               "--max-temp-gb", str(budget_gib), "--out", str(out), *TINY])
    assert rc == 0  # skipping is a result, not a failure
    assert "skipped" in capsys.readouterr().out
    result = json.loads(out.read_text())
    budget = result["memory_budget"]["bytes"]
    assert budget == int(budget_gib * 1024 ** 3)
    assert out.with_suffix(".csv").exists() and out.with_suffix(".png").exists()
    n_skipped = 0
    for row in result["rows"]:
        for phase in PHASES:
            over = row[f"{phase}_temp_bytes"] > budget
            assert row[f"{phase}_status"].startswith("skipped: needs") == over, row
            if over:
                n_skipped += 1
                assert row[f"{phase}_ms"] is None and row[f"{phase}_gflop_per_s"] is None
                assert "budget" in row[f"{phase}_status"]
        assert row["status"].startswith("skipped") == any(row[f"{p}_status"] != "ok" for p in PHASES)
    assert n_skipped > 0


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit code 2, nothing run
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "64,abc"], "--seq-lens: 'abc' is not an integer"),
    (["--seq-lens", "1.5"], "--seq-lens: '1.5' is not an integer"),
    (["--seq-lens", "64,0"], "--seq-lens: 0 is not positive"),
    (["--seq-lens", "-128"], "--seq-lens: -128 is not positive"),
    (["--impls", "reference,flash"], "unknown implementation 'flash'; valid: auto, reference, xla, blockwise"),
    (["--heads", "3", "--kv-heads", "2"], "--heads 3 must be divisible by --kv-heads 2"),
    (["--head-dim", "0"], "--head-dim must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--max-temp-gb", "0"], "--max-temp-gb must be a positive number"),
    (["--out", "results.txt"], "--out must name a .json file"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(["bench", "attention", "--seq-lens", "64", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cudnn is valid on a GPU")
def test_cli_cudnn_without_gpu_is_a_clear_error(capsys):
    assert main(["bench", "attention", "--seq-lens", "64", "--impls", "cudnn"]) == 2
    err = capsys.readouterr().err
    assert "'cudnn' needs a GPU" in err and "reference, xla, blockwise" in err


def test_impls_depend_on_backend():
    assert available_impls("cpu") == ("reference", "xla", "blockwise")
    # pallas_gpu (jax's Pallas Triton flash attention) is listed on a GPU whenever jax ships it; it takes f32 too.
    pallas = ("pallas_gpu",) if importlib.util.find_spec("jax.experimental.pallas.ops.gpu.attention") else ()
    assert available_impls("gpu", "bfloat16") == ("reference", "xla", "blockwise", "cudnn", *pallas)
    assert available_impls("gpu", "float32") == ("reference", "xla", "blockwise", *pallas)  # cuDNN has no f32
    assert check_impls(["cudnn", "blockwise", "cudnn"], backend="gpu", dtype="bfloat16") == ("cudnn", "blockwise")
    with pytest.raises(ValueError, match="'cudnn' needs --dtype bfloat16 or float16"):
        check_impls(["cudnn"], backend="gpu", dtype="float32")
    with pytest.raises(ValueError, match="needs a GPU"):
        check_impls(["cudnn"], backend="cpu", dtype="bfloat16")


def test_parse_int_list():
    assert parse_int_list("1024, 2048,4096", "--seq-lens") == (1024, 2048, 4096)
    with pytest.raises(ValueError, match="--seq-lens: '' is not an integer"):
        parse_int_list("1024,,2048", "--seq-lens")


def test_cli_trace_writes_a_profile(tmp_path):
    trace = tmp_path / "trace"
    rc = main(["bench", "attention", "--seq-lens", "64", "--impls", "blockwise", "--trace", str(trace),
               "--trace-steps", "1", *TINY])
    assert rc == 0
    files = [p for p in (trace / "blockwise-T64").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".xplane.pb") for p in files), files
