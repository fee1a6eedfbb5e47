"""Work per device per ring step: (query block, key block) pairs the ring kernel computes, zigzag vs contiguous.

`python -m jaxctx.bench.ring_work --seq-len 65536 --sequence 4,8 --out FILE.json` writes FILE.json and FILE.csv:
one row per (layout, N, device) with the non-skipped block pairs at each ring step (`jaxctx.ops.ring.ring_work`:
the kernel's own plan and block classification, causal, no segments) and the device's share of the total. The
imbalance of a layout is max / min over devices of the per-device total, minus 1. Counting only: nothing runs.
"""

from __future__ import annotations

import argparse
import sys

from jaxctx.bench import report
from jaxctx.bench.machine import machine_info
from jaxctx.ops.ring import LAYOUTS, ring_work


def ring_work_table(seq_len: int, sequences, block: int | None = None) -> dict:
    """JSON-ready rows and per-(layout, N) imbalance of causal ring attention at one sequence length."""
    rows, summary = [], []
    for n in sequences:
        for layout in LAYOUTS:
            work = ring_work(seq_len, n, layout=layout, causal=True, block_q=block, block_k=block)  # [N, N]
            totals = work.sum(axis=1)
            summary.append({"layout": layout, "sequence": n, "max_blocks": int(totals.max()),
                            "min_blocks": int(totals.min()), "imbalance": float(totals.max() / totals.min() - 1)})
            for r in range(n):
                rows.append({"layout": layout, "sequence": n, "device": r, "total_blocks": int(totals[r]),
                             **{f"step_{s}": int(work[r, s]) for s in range(n)}})
    return {"bench": "ring-work", "machine": machine_info(), "seq_len": seq_len, "block": block,
            "summary": summary, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxctx.bench.ring_work", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--sequence", default="4,8", help="comma-separated axis sizes N")
    p.add_argument("--block", type=int, default=None, help="block_q = block_k (default: the kernel's)")
    p.add_argument("--out", required=True, metavar="FILE.json")
    args = p.parse_args(argv)
    result = ring_work_table(args.seq_len, [int(x) for x in args.sequence.split(",")], args.block)
    paths = report.output_paths(args.out)
    report.write_json(paths["json"], result)
    report.write_csv(paths["csv"], result)
    for s in result["summary"]:
        print(f"{s['layout']:>10} N={s['sequence']}: per-device blocks {s['min_blocks']}..{s['max_blocks']}, "
              f"imbalance {100 * s['imbalance']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
