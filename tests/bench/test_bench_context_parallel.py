"""Bytes the context-parallel kernels send, and `jaxctx bench attention --impls ring,all_gather --sequence N`.

The figures `ring_traffic` derives from the shapes are checked against an independent count: the collectives
XLA kept in the compiled program (`collective_bytes` over its HLO text). f32 inputs: XLA:CPU computes bf16
collectives in f32, so only f32 makes the two comparable on this machine (docs/benchmarks.md).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxctx.bench.collectives import collective_bytes
from jaxctx.cli import main
from jaxctx.ops.ring import ring_attention_in_layout, ring_traffic, to_layout_index

TINY = ["--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
        "--matmul-size", "64", "--block-q", "16", "--block-k", "16"]


def _compiled_fwd_bwd(strategy, b, t, h, hkv, d, n, blk, segments):
    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
    seq = NamedSharding(mesh, P(None, "sequence"))
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32, sharding=seq)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.float32, sharding=seq)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=seq) if segments else None
    positions = jnp.asarray(to_layout_index(t, n))

    def fwd_bwd(q, k, v, ct, seg):
        def attend(q, k, v):
            return ring_attention_in_layout(q, k, v, positions, mesh=mesh, causal=True, segment_ids=seg,
                                            strategy=strategy, block_q=blk, block_k=blk)

        out, pullback = jax.vjp(attend, q, k, v)
        return pullback(ct)

    # Unoptimised LLVM code generation halves the compile time; the HLO passes (what is counted) still run.
    return jax.jit(fwd_bwd).lower(q, kv, kv, q, seg).compile({"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("strategy, b, t, h, hkv, d, n, blk, segments", [
    ("ring", 2, 128, 4, 2, 8, 4, 16, True),  # GQA, packed segments
    ("all_gather", 2, 128, 4, 2, 8, 4, 16, True),
    ("ring", 1, 96, 2, 1, 8, 3, 16, False),  # MQA, odd axis size, Tl=32
    ("all_gather", 1, 96, 2, 2, 8, 4, 16, False),  # Tl=24 pads to 32 locally: segment ids appear and travel
])
def test_traffic_formula_matches_the_compiled_collectives(strategy, b, t, h, hkv, d, n, blk, segments):
    want = ring_traffic(b, t, hkv, d, n, strategy=strategy, segment_ids=segments, block_q=blk, block_k=blk)
    got = collective_bytes(_compiled_fwd_bwd(strategy, b, t, h, hkv, d, n, blk, segments).as_text())
    if strategy == "ring":
        # Forward N-1 hops of the chunk; backward N-1 hops of the chunk and N of its f32 dK/dV.
        assert got == {"collective-permute": want["fwd"]["collective-permute"] + want["bwd"]["collective-permute"]}
    else:
        # In one program XLA shares the forward's gather with the backward's identical re-gather (no remat
        # boundary between them), so the K/V chunks are gathered once; dK/dV are reduce-scattered.
        assert want["fwd"]["all-gather"] == want["bwd"]["all-gather"]
        assert got == {"all-gather": want["fwd"]["all-gather"], "reduce-scatter": want["bwd"]["reduce-scatter"]}


def test_traffic_formula_by_hand():
    # B=1, T=1024, Hkv=2, D=64 bf16 over N=4: a chunk is 256 tokens of K and V (2*256*2*64*2 bytes = 128 KiB)
    # plus 256 int32 positions (1 KiB); dK/dV travel in f32 (256 KiB).
    ring = ring_traffic(1, 1024, 2, 64, 4, strategy="ring", dtype="bfloat16")
    chunk, grads = 2 * 256 * 2 * 64 * 2 + 256 * 4, 2 * 256 * 2 * 64 * 4
    assert ring == {"fwd": {"collective-permute": 3 * chunk}, "bwd": {"collective-permute": 3 * chunk + 4 * grads}}
    gathered = ring_traffic(1, 1024, 2, 64, 4, strategy="all_gather", dtype="bfloat16")
    assert gathered == {"fwd": {"all-gather": 3 * chunk}, "bwd": {"all-gather": 3 * chunk, "reduce-scatter": 3 * grads}}
    assert ring_traffic(1, 1024, 2, 64, 1) == {"fwd": {}, "bwd": {}}  # one device sends nothing
    with pytest.raises(ValueError, match="seq_len=1000 must be divisible by the axis size n=3"):
        ring_traffic(1, 1000, 2, 64, 3)


HLO = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(f)/shard_map/while/body/ppermute"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[4,8], y: bf16[2,8]) -> f32[16,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %y = bf16[2,8]{1,0} parameter(1)
  %init = (s32[], f32[4,8]{1,0}) tuple(%c0, %x)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = (f32[4,8]{1,0}, bf16[2,8]{1,0}) all-reduce(%x, %y), replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add
  %rs = f32[1,8]{1,0} reduce-scatter(%x), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %ag = f32[16,8]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
}
"""


def test_collective_bytes_counts_loops_groups_and_tuples():
    got = collective_bytes(HLO)
    assert got == {
        "collective-permute": 3 * 4 * 8 * 4,  # 128 bytes, once per iteration of a 3-trip loop
        "all-reduce": 2 * (128 + 32) * 3 // 4,  # both operands, group of 4 ('b'): 2 (g-1)/g
        "reduce-scatter": 128 - 32,
        "all-gather": 512 - 128,
    }
    assert collective_bytes(HLO, op_name="/shard_map/") == {"collective-permute": 3 * 4 * 8 * 4}
    with pytest.raises(ValueError, match="no known trip count"):
        collective_bytes(HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))


# ----------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # four compiles and runs of fwd / fwd+bwd over 4 devices: ~35-50 s on 2 shared cores
def test_cli_context_parallel_rows(tmp_path, capsys):
    out = tmp_path / "cp.json"
    rc = main(["bench", "attention", "--impls", "ring,all_gather", "--sequence", "4", "--seq-lens", "128",
               "--out", str(out), *TINY])
    assert rc == 0
    assert "f+b sent MiB" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["sequence"] == 4 and "hlo_sent_bytes" in result["communication"]
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"ring", "all_gather"}
    for impl, row in rows.items():
        assert row["status"] == "ok" and row["sequence"] == 4 and row["layout"] == "zigzag"
        traffic = ring_traffic(1, 128, 2, 8, 4, strategy=impl, block_q=16, block_k=16)
        fwd, bwd = sum(traffic["fwd"].values()), sum(traffic["bwd"].values())
        assert (row["fwd_sent_bytes"], row["fwd_bwd_sent_bytes"]) == (fwd, fwd + bwd)
        assert row["fwd_hlo_sent_bytes"] == fwd  # the compiled forward sends exactly the schedule
        # Memory is per device: the forward's arguments are this device's T/4 tokens of q, k, v.
        local_args = (128 // 4) * (4 + 2 + 2) * 8 * 4
        assert row["fwd_argument_mib"] == pytest.approx(local_args / 2 ** 20, rel=1e-4)
        assert row["fwd_total_mib"] >= row["fwd_argument_mib"] + row["fwd_output_mib"]
    assert rows["ring"]["fwd_bwd_hlo_sent_bytes"] == rows["ring"]["fwd_bwd_sent_bytes"]
    # all_gather in one fwd+bwd program: the backward reuses the forward's gathered K/V (see above).
    assert rows["all_gather"]["fwd_bwd_hlo_sent_bytes"] < rows["all_gather"]["fwd_bwd_sent_bytes"]
    # Gathering keeps every chunk at once; the ring holds one or two: its per-device memory is smaller.
    assert rows["ring"]["fwd_bwd_temp_bytes"] < rows["all_gather"]["fwd_bwd_temp_bytes"]
    csv_header = out.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert {"sequence", "layout", "fwd_sent_bytes", "fwd_bwd_hlo_sent_bytes", "fwd_bwd_total_mib"} <= set(csv_header)


@pytest.mark.parametrize("argv, message", [
    (["--impls", "ring"], "--impls ring splits each sequence over devices: give --sequence N"),
    (["--impls", "blockwise", "--sequence", "2"], "--sequence applies to the context-parallel impls"),
    (["--impls", "ring,xla", "--sequence", "2"], "got --impls xla"),
    (["--impls", "ring", "--sequence", "16"], "--sequence 16 needs 16 devices, this process has 8"),
    (["--impls", "ring", "--sequence", "0"], "--sequence must be a positive integer"),
    (["--impls", "all_gather", "--sequence", "3", "--seq-lens", "64"], "--seq-lens: 64 is not divisible by 6"),
    (["--impls", "ring", "--sequence", "2", "--layout", "spiral"], "--layout 'spiral' is unknown"),
])
def test_cli_context_parallel_bad_input(argv, message, capsys):
    assert main(["bench", "attention", "--seq-lens", "128", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
