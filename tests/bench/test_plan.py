"""`jaxctx plan`: the per-device memory breakdown of a config's compiled step, and whether it fits."""

from __future__ import annotations

import json

import pytest

from jaxctx import config as config_lib
from jaxctx.bench.plan import run_plan
from jaxctx.bench.trainstep import parse_memory_usage_report
from jaxctx.cli import main

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def plan():
    return run_plan(TINY, (), devices=1, buffers=4)


def test_plan_breakdown_adds_up(plan):
    cfg = config_lib.load(TINY)
    rows = {r["component"].split(" (")[0]: r["bytes"] for r in plan["rows"]}
    c = plan["compiled"]
    params = plan["params"]["total"]
    assert rows["params"] == 4 * params  # float32, one device holds them all
    assert rows["optimizer state"] >= 2 * 4 * params  # AdamW mu and nu (+ counters)
    assert rows["batch"] == 5 * cfg.train.batch_size * cfg.data.seq_len * 4  # five int32/float32 [B, T] arrays
    # The state and the batch are the step's arguments; donation aliases the new state onto the old one.
    assert c["argument_bytes"] == rows["params"] + rows["optimizer state"] + rows["batch"]
    assert c["total_bytes"] == c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    assert rows["total per device"] == c["total_bytes"]
    assert rows["temp"] == c["temp_bytes"] > 0
    assert plan["fits"] is True and 0 < plan["fraction_of_capacity"] < 1
    assert plan["capacity"]["bytes"] > 0 and "host RAM" in plan["capacity"]["source"]
    assert {"backend", "device_kind", "device_count", "jax_version", "cpu_model"} <= set(plan["machine"])


def test_plan_lists_the_largest_temp_buffers(plan):
    slots = plan["top_temp_buffers"]
    assert 0 < len(slots) <= 4
    sizes = [s["mib"] for s in slots]
    assert sizes == sorted(sizes, reverse=True)
    assert sum(sizes) <= plan["compiled"]["temp_bytes"] / 2 ** 20 * 1.001  # slots are parts of the temp allocation
    assert all("[" in s["shapes"] for s in slots)


def test_parse_memory_usage_report():
    text = """Memory Space: default (color=0)
Total bytes: 9844951981 (9.17GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    2.25GiB( 29%);    2.25GiB;            0;                6; f32[50304,768], 5×f32[12,1,65536,768]
    2.44GiB( 31%);  196.50MiB;   2621964288;                3; f32[1024,50304], 2×f32[1,1024,50304]
    2.63GiB( 34%);    3.00KiB;   2415919104;                1; f32[768]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
    9.00GiB(100%);    9.00GiB;            0;                2; 2×f32[65536,768]
"""
    rows = parse_memory_usage_report(text, top=2)
    assert rows == [
        {"bytes": int(2.25 * 2 ** 30), "values": 6, "shapes": "f32[50304,768], 5×f32[12,1,65536,768]"},
        {"bytes": int(196.5 * 2 ** 20), "values": 3, "shapes": "f32[1024,50304], 2×f32[1,1024,50304]"},
    ]  # only the first (main memory space) table, largest first


def test_plan_cli_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", TINY, "--devices", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "params" in text and "optimizer state" in text and "total per device" in text and "fits:" in text
    result = json.loads(out.read_text())
    assert result["bench"] == "plan" and result["fits"] is True and out.with_suffix(".csv").exists()


def test_plan_of_a_config_that_does_not_fit(capsys):
    # 1M tokens of materialised attention: [1, 2, T, T] float32 scores alone are 8 TiB.
    argv = ["plan", "--config", TINY, "--devices", "1", "--set", "data.seq_len=1048576",
            "--set", "model.attention=reference", "--set", "train.batch_size=1"]
    assert main(argv) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_plan_bad_input_is_a_clear_error(capsys):
    assert main(["plan", "--config", TINY, "--set", "model.remat_policy=sometimes"]) == 2
    err = capsys.readouterr().err
    assert "model.remat_policy='sometimes' is not one of" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# Context parallelism: what the interconnect carries
# ----------------------------------------------------------------------------------------------------------

CP = ["--set", "parallel.sequence=4", "--set", "train.batch_size=2"]


def _expected_per_layer(strategy):
    """ring_traffic for the tiny config's per-device share: 2 rows, 128 / 4 tokens, 2 kv heads of 32, f32."""
    from jaxctx.ops.ring import ring_traffic

    t = ring_traffic(2, 128, 2, 32, 4, strategy=strategy, segment_ids=True)
    return sum(t["fwd"].values()), sum(t["bwd"].values())


def test_plan_shows_bytes_sent_per_layer_under_context_parallelism(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", TINY, "--devices", "4", *CP, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "interconnect, bytes each device sends per step: parallel.sequence=4" in text
    assert "ring (configured)" in text and "all_gather" in text and "compiled step" in text
    c = json.loads(out.read_text())["communication"]
    assert (c["sequence"], c["strategy"], c["layers"], c["rows_per_device"]) == (4, "ring", 2, 2)
    for strategy in ("ring", "all_gather"):
        fwd, bwd = _expected_per_layer(strategy)
        t = c["per_layer"][strategy]
        assert (t["fwd_bytes"], t["bwd_bytes"], t["per_step_bytes"]) == (fwd, bwd, 2 * (fwd + bwd))
    # The compiled step (remat_policy=none): the ring kernel's collectives are exactly 2 layers x fwd+bwd.
    assert c["compiled_attention_by_op"] == {"collective-permute": c["per_layer"]["ring"]["per_step_bytes"]}
    # The rest of the step: parameters are replicated over `sequence`, so gradients are all-reduced over it.
    assert c["compiled_step_by_op"]["all-reduce"] > 0
    assert c["compiled_step_bytes"] > c["compiled_attention_bytes"]


def test_plan_without_context_parallelism_has_no_traffic(plan):
    assert plan["communication"] is None


@pytest.mark.slow  # two ~20 s step compiles on 4 fake devices
@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_plan_full_remat_recomputes_the_ring_forward(strategy):
    """remat_policy=full reruns each layer's forward in the backward pass: the ring sends its forward hops
    again; all_gather's recomputed gather is the backward's re-gather (XLA shares them), so nothing more."""
    result = run_plan(TINY, ("parallel.sequence=4", "train.batch_size=2", "model.remat_policy=full",
                             f"model.context_parallel={strategy}"), devices=4)
    fwd, bwd = _expected_per_layer(strategy)
    extra = fwd if strategy == "ring" else 0
    assert result["communication"]["compiled_attention_bytes"] == 2 * (fwd + bwd + extra)
