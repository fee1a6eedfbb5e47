"""`jaxctx bench train --profile`: HLO categories from a hand-written module, exclusive times from synthetic nested
trace events, and the whole path on a real traced step (the categories add up to the op time, matmuls are found,
the table is printed and saved)."""

import json
import os

import pytest

from jaxctx.bench import step_profile as sp

HLO = """HloModule jit_step, entry_computation_layout={(f32[8,8]{1,0})->f32[8,8]{1,0}}

%fused_computation (param_0: f32[8,8], param_1: f32[8,8]) -> f32[8,8] {
  %param_0 = f32[8,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  %dot.1 = f32[8,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %add.1 = f32[8,8]{1,0} add(%dot.1, %param_1)
}

%fused_computation.1 (param_0.1: f32[8,8]) -> f32[8,8] {
  %param_0.1 = f32[8,8]{1,0} parameter(0)
  %transpose.1 = f32[8,8]{0,1} transpose(%param_0.1), dimensions={1,0}
  ROOT %copy.1 = f32[8,8]{1,0} copy(%transpose.1)
}

%fused_computation.2 (param_0.2: f32[8,8]) -> f32[8,8] {
  %param_0.2 = f32[8,8]{1,0} parameter(0)
  ROOT %exponential.1 = f32[8,8]{1,0} exponential(%param_0.2)
}

%body (arg: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %arg = (s32[], f32[8,8]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%arg), index=0
  %gte.1 = f32[8,8]{1,0} get-tuple-element(%arg), index=1
  %exp_fusion = f32[8,8]{1,0} fusion(%gte.1), kind=kLoop, calls=%fused_computation.2
  ROOT %tuple.1 = (s32[], f32[8,8]{1,0}) tuple(%gte.0, %exp_fusion)
}

ENTRY %main.9 (Arg_0.1: f32[8,8]) -> f32[8,8] {
  %Arg_0.1 = f32[8,8]{1,0} parameter(0)
  %ynn_fusion = f32[8,8]{1,0} fusion(%Arg_0.1, %Arg_0.1), kind=kCustom, calls=%fused_computation, metadata={op_name="jit(step)/transpose(jvp(loss))/layers/mlp/dot_general"}
  %copy_fusion = f32[8,8]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_computation.1
  %reduce.3 = f32[8]{0} reduce(%copy_fusion, %constant.1), dimensions={1}, to_apply=%region_0
  %while.5 = (s32[], f32[8,8]{1,0}) while(%tuple.0), condition=%cond, body=%body
  ROOT %dot.9 = f32[8,8]{1,0} dot(%copy_fusion, %Arg_0.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_hlo_categories():
    instructions, computations = sp.parse_hlo(HLO)
    assert computations["fused_computation"] == ["parameter", "parameter", "dot", "add"]
    got = {name: sp.category(instructions[name], computations)
           for name in ("ynn_fusion", "copy_fusion", "reduce.3", "while.5", "dot.9", "exp_fusion", "gte.1")}
    assert got == {"ynn_fusion": "matmul", "copy_fusion": "copy/layout", "reduce.3": "reduce", "while.5": "control",
                   "dot.9": "matmul", "exp_fusion": "elementwise", "gte.1": "other"}
    assert instructions["while.5"]["opcode"] == "while"  # a tuple result type is skipped to find the opcode
    assert sp._short_source(instructions["ynn_fusion"]["op_name"]) == "bwd layers/mlp/dot_general"


def test_exclusive_times_subtract_nested_ops_per_thread():
    ev = [  # thread 1: while.5 [0, 100) holds exp_fusion twice and runtime bookkeeping; thread 2 runs dot.9
        {"ph": "X", "name": "while.5", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 5, "dur": 80, "pid": 1, "tid": 1},
        {"ph": "X", "name": "exp_fusion", "ts": 10, "dur": 30, "pid": 1, "tid": 1},
        {"ph": "X", "name": "exp_fusion", "ts": 50, "dur": 20, "pid": 1, "tid": 1},
        {"ph": "X", "name": "dot.9", "ts": 20, "dur": 40, "pid": 1, "tid": 2},
        {"ph": "X", "name": "dot.9", "ts": 120, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "i", "name": "dot.9", "ts": 125, "pid": 1, "tid": 1},  # not a duration event
    ]
    got = sp.exclusive_times(ev, {"while.5", "exp_fusion", "dot.9"})
    assert got == {"while.5": 50, "exp_fusion": 50, "dot.9": 50}


def test_bench_train_profile_end_to_end(tmp_path, capsys):
    from jaxctx.cli import main

    out = tmp_path / "p.json"
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                        "tiny.yaml")
    assert main(["bench", "train", "--config", tiny, "--seq-lens", "128", "--batch", "2", "--repeats", "1",
                 "--warmup", "1", "--profile", "--trace-steps", "2", "--devices", "1", "--matmul-size", "256",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][0]
    profile = row["profile"]
    assert profile["steps"] == 2 and row["trace"] is None  # the scratch trace is deleted
    cats = {r["category"]: r for r in profile["categories"]}
    assert cats["matmul"]["ms_per_step"] > 0 and set(cats) <= set(sp.CATEGORIES)
    assert sum(r["ms_per_step"] for r in cats.values()) == pytest.approx(profile["op_ms_per_step"], rel=1e-3)
    assert sum(r["share"] for r in cats.values()) == pytest.approx(1.0, abs=1e-3)
    assert row["op_share_matmul"] == cats["matmul"]["share"]
    assert len(profile["top_ops"]) == 12 and all(r["category"] in cats for r in profile["top_ops"])
    assert "most expensive ops:" in printed and f"op time per step {profile['op_ms_per_step']:,.1f} ms" in printed
    assert "op_share_matmul" in (tmp_path / "p.csv").read_text().splitlines()[0]
