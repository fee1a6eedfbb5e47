"""benchmarks/gpu/check --dry-run in CI: the one-shot GPU script must not rot between GPU sessions.

The dry run is the real script (every section, the subprocess isolation, the time budget, the report files) on
tiny shapes and the CPU backend; GPU-only kernels are recorded as skipped rows.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu" / "check"
SECTIONS = ("parity", "attention", "train", "max_context")
FILES = {"parity": ("json", "csv"), "attention": ("json", "csv", "png"), "train": ("json", "csv", "png"),
         "max_context": ("json", "csv", "png")}


def _run(tmp_path, *args, timeout=600):
    # One CPU device, as on a real single-GPU run (the suite's fake 8-device XLA_FLAGS are not passed on).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return proc, time.perf_counter() - start


def _summary(tmp_path):
    found = list(tmp_path.glob("*-gpu-check-summary.json"))
    assert len(found) == 1, sorted(p.name for p in tmp_path.iterdir())
    return found[0], json.loads(found[0].read_text())


def test_script_is_executable_python():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


@pytest.mark.slow
def test_dry_run_writes_every_section_and_a_summary(tmp_path):
    # A generous budget: CI machines are shared; on an idle 2-core machine the dry run takes ~1.5 minutes.
    proc, wall = _run(tmp_path, "--budget-s", "420")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, summary = _summary(tmp_path)
    assert path.name == "cpu-gpu-check-summary.json"  # named after the device kind
    assert summary["mode"] == "dry-run" and summary["device_kind"] == "cpu"
    assert [s["section"] for s in summary["sections"]] == list(SECTIONS)
    for s in summary["sections"]:
        assert s["status"] == "ok", s
        assert s["headline"] and s["elapsed_s"] >= 0
        for ext in FILES[s["section"]]:
            f = tmp_path / f"cpu-gpu-check-{s['section'].replace('_', '-')}.{ext}"
            assert f.exists() and f.stat().st_size > 0, f
            assert f.name in s["files"] or ext == "csv" and s["section"] == "parity"
    assert summary["elapsed_s"] <= wall + 1  # the summary's own clock agrees with ours
    table = (tmp_path / "cpu-gpu-check-summary.md").read_text()
    assert "| section | status | time (s) | result |" in table
    for name in SECTIONS:
        assert f"| {name} | ok |" in table
    assert table.strip().splitlines()[-1].startswith("Targets:") and table in proc.stdout + "\n"

    parity = json.loads((tmp_path / "cpu-gpu-check-parity.json").read_text())
    by_impl = {(r["impl"], r["dtype"]): r for r in parity["rows"]}
    for dtype in ("bfloat16", "float32"):
        assert by_impl[("blockwise", dtype)]["status"] == "ok"
        assert by_impl[("blockwise", dtype)]["max_rel_err"] <= parity["tolerance"][dtype]
        assert by_impl[("pallas_gpu", dtype)]["status"].startswith("skipped: pallas_gpu needs a GPU")
    attention = json.loads((tmp_path / "cpu-gpu-check-attention.json").read_text())
    assert attention["bench"] == "attention" and {r["seq_len"] for r in attention["rows"]} == {64, 128}
    assert all(r["fwd_bwd_ms"] > 0 for r in attention["rows"] if r["status"] == "ok")
    assert any(r["impl"] == "auto" and r["kernel"] == "blockwise" for r in attention["packed_rows"])
    train = json.loads((tmp_path / "cpu-gpu-check-train.json").read_text())
    assert {r["model_family"] for r in train["rows"]} == {"gpt2", "llama"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in train["rows"])
    mc = json.loads((tmp_path / "cpu-gpu-check-max-context.json").read_text())
    assert {r["variant"] for r in mc["rows"]} == {"vanilla", "memory_efficient", "blockwise"}
    assert mc["measured"] and mc["measured"][0]["status"] == "ok" and mc["measured"][0]["plan_total_gib"] > 0


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path):
    proc, _ = _run(tmp_path, "--sections", "attention,parity", "--inject-failure", "attention", "--budget-s", "300")
    assert proc.returncode == 1  # not every section ok
    _, summary = _summary(tmp_path)
    status = {s["section"]: s["status"] for s in summary["sections"]}
    assert status["attention"].startswith("error: RuntimeError: injected failure"), status
    assert status["parity"] == "ok", status
    assert (tmp_path / "cpu-gpu-check-parity.json").exists()
    assert "| attention | error:" in (tmp_path / "cpu-gpu-check-summary.md").read_text()
