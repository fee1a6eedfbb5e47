"""The committed ring-work table: zigzag balanced within 5% across devices, contiguous not."""

import json
import pathlib

from jaxctx.bench.ring_work import main, ring_work_table

COMMITTED = pathlib.Path(__file__).parents[2] / "benchmarks/results/cpu-2core-ring-work-65536.json"


def test_zigzag_within_5_percent_contiguous_imbalanced():
    result = ring_work_table(16384, [4, 8])
    imbalance = {(s["layout"], s["sequence"]): s["imbalance"] for s in result["summary"]}
    for n in (4, 8):
        assert imbalance["zigzag", n] <= 0.05
        assert imbalance["contiguous", n] > 0.05
    for row in result["rows"]:  # the per-step columns add up to the device's total
        assert row["total_blocks"] == sum(row[f"step_{s}"] for s in range(row["sequence"]))


def test_committed_table_is_what_the_command_writes(tmp_path):
    out = tmp_path / "work.json"
    assert main(["--seq-len", "65536", "--sequence", "4,8", "--out", str(out)]) == 0
    fresh, committed = json.loads(out.read_text()), json.loads(COMMITTED.read_text())
    assert fresh["rows"] == committed["rows"] and fresh["summary"] == committed["summary"]
    assert all(s["imbalance"] <= 0.05 for s in committed["summary"] if s["layout"] == "zigzag")
    assert out.with_suffix(".csv").exists()
