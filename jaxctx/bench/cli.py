"""`jaxctx bench <kind>`: command-line front end of the benches.

Registered by `jaxctx.cli` through `register(subparsers)`. Only argparse runs at import time; jax and the bench
modules are imported when a bench actually runs, so `jaxctx --help` stays instant.

Each bench kind is one `_register_<kind>` function added to `_BENCHES` (today: attention; `train` and
`max-context` slot in the same way) and shares the output/timing flags of `_common_flags()`.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384,32768"  # mirrors jaxctx.bench.attention.DEFAULT_SEQ_LENS
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    """Add `bench` and its sub-subcommands to the top-level `jaxctx` parser."""
    parser = subparsers.add_parser(
        "bench", help="benchmark kernels and train steps: time, memory, FLOP rate",
        description="Benchmarks with machine-stamped JSON/CSV/PNG results. See docs/bench.md.")
    kinds = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    kinds.required = True
    common = _common_flags()
    for register_kind in _BENCHES:
        register_kind(kinds, common)


def _common_flags() -> argparse.ArgumentParser:
    """Flags every bench kind takes (an argparse parent parser, so each kind lists them in its own --help)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", metavar="FILE.json",
                        help="save results to FILE.json, plus FILE.csv and FILE.png next to it")
    common.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="timed runs per measurement; the median is reported (default: 3)")
    common.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="untimed runs before timing (default: 1)")
    common.add_argument("--max-temp-gb", type=float, default=None, metavar="GIB",
                        help="skip configurations whose compiled temp memory exceeds this many GiB "
                             "(default: half the host RAM on CPU, 90%% of device memory on GPU/TPU)")
    return common


# ----------------------------------------------------------------------------------------------------------
# bench attention
# ----------------------------------------------------------------------------------------------------------

def _register_attention(kinds, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "attention", parents=[common],
        help="forward and forward+backward time, GFLOP/s and compiled memory of the attention kernels",
        description="Sweep attention implementations over sequence lengths: median forward and forward+backward "
                    "time, useful GFLOP/s (forward 4*B*H*T^2*D, halved when causal; backward 2.5x forward), "
                    "fraction of a matmul rate measured in the same run, and compiled temp memory. "
                    "Configurations over the memory budget are skipped with a note.")
    p.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS, metavar="T,T,...",
                   help=f"comma-separated sequence lengths (default: {DEFAULT_SEQ_LENS})")
    p.add_argument("--impls", default=None, metavar="NAME,...",
                   help="comma-separated implementations: reference, xla, blockwise, cudnn (GPU, bf16/f16), "
                        "splash (TPU), auto (default: all that run on this backend and dtype)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal masking (default: --causal)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="q/k/v dtype (default: float32)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default: 1)")
    p.add_argument("--heads", type=int, default=8, metavar="H", help="query heads (default: 8)")
    p.add_argument("--kv-heads", type=int, default=None, metavar="HKV",
                   help="key/value heads, dividing --heads (default: = --heads)")
    p.add_argument("--head-dim", type=int, default=64, metavar="D", help="head dimension (default: 64)")
    p.add_argument("--block-q", type=int, default=None, metavar="N", help="blockwise query block (default: kernel's)")
    p.add_argument("--block-k", type=int, default=None, metavar="N", help="blockwise key block (default: kernel's)")
    p.add_argument("--matmul-size", type=int, default=None, metavar="N",
                   help="n of the n x n matmul whose rate GFLOP/s are compared to "
                        "(default: 2048 on CPU, 8192 on accelerators)")
    p.set_defaults(func=run_attention)


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1024,2048' -> (1024, 2048); anything but positive integers is a ValueError naming the flag."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not an integer; give comma-separated positive integers, "
                             f"e.g. {flag} 1024,2048,4096") from None
        if value <= 0:
            raise ValueError(f"{flag}: {value} is not positive; give comma-separated positive integers, "
                             f"e.g. {flag} 1024,2048,4096")
        values.append(value)
    return tuple(values)


def parse_name_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run_attention(args: argparse.Namespace) -> int:
    """`jaxctx bench attention`: validate everything, run the sweep, print the table, save the files."""
    from jaxctx.bench import report
    from jaxctx.bench.attention import AttentionBenchConfig, run_attention_bench

    cfg = AttentionBenchConfig(
        seq_lens=parse_int_list(args.seq_lens, "--seq-lens"), impls=parse_name_list(args.impls),
        causal=args.causal, dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, block_q=args.block_q, block_k=args.block_k, repeats=args.repeats,
        warmup=args.warmup, max_temp_gb=args.max_temp_gb, matmul_size=args.matmul_size,
    ).validated()  # fail on bad input before the (slow) matmul reference and sweep start
    paths = report.output_paths(args.out) if args.out else None

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def save_partial(result: dict) -> None:
        if paths:  # keep finished rows on disk: a multi-hour sweep killed at T=32768 loses only that row
            report.write_json(paths["json"], result)

    result = run_attention_bench(cfg, progress=progress, on_row=save_partial)
    print(report.format_report(result))
    if paths:
        report.save(result, paths["json"])
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    errors = [r for r in result["rows"] if r["status"].startswith("error")]
    return 1 if errors else 0


_BENCHES = (_register_attention,)
