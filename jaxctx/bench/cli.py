"""`jaxctx bench <kind>`: command-line front end of the benches.

Registered by `jaxctx.cli` through `register(subparsers)`. Only argparse runs at import time; jax and the bench
modules are imported when a bench actually runs, so `jaxctx --help` stays instant.

Each bench kind is one `_register_<kind>` function added to `_BENCHES` (attention, train, max-context,
generate); the timed benches share the output/timing flags of `_common_flags()`. `register` also adds the
top-level `jaxctx plan`, which compiles one config's step like the benches do.
"""

from __future__ import annotations

import argparse
import sys
from jaxctx.errors import UsageError

DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384,32768"  # mirrors jaxctx.bench.attention.DEFAULT_SEQ_LENS
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    """Add `bench` (and its sub-subcommands) and `plan` to the top-level `jaxctx` parser."""
    parser = subparsers.add_parser(
        "bench", help="benchmark kernels and train steps: time, memory, FLOP rate",
        description="Benchmarks with machine-stamped JSON/CSV/PNG results. See docs/benchmarks.md.")
    kinds = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    kinds.required = True
    common = _common_flags()
    for register_kind in _BENCHES:
        register_kind(kinds, common)
    _register_plan(subparsers)


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
                        help="skip configurations whose compiled memory exceeds this many GiB (attention: temp; "
                             "train: total per device) (default: half the host RAM on CPU, 90%% of device "
                             "memory on GPU/TPU)")
    common.add_argument("--trace", dest="trace_dir", default=None, metavar="DIR",
                        help="also capture a jax.profiler trace of a few calls per configuration into DIR/<name>/ "
                             "(after timing; view with TensorBoard's profile plugin or ui.perfetto.dev)")
    common.add_argument("--trace-steps", type=int, default=3, metavar="N", help="calls traced (default: 3)")
    return common


def _config_flags() -> argparse.ArgumentParser:
    """--config / --set / --devices: the experiment a train-step bench measures."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--config", default=None, metavar="FILE",
                       help="YAML experiment file (default: the embedded default)")
    flags.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set model.dtype=float32 (repeatable)")
    flags.add_argument("--devices", type=int, default=None, metavar="N",
                       help="use the first N devices for the mesh (default: all)")
    return flags


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
                        "splash (TPU), auto (default: all that run on this backend and dtype); or the "
                        "context-parallel ring, all_gather (with --sequence N)")
    p.add_argument("--sequence", type=int, default=None, metavar="N",
                   help="ring / all_gather: split each sequence over the first N devices; rows then report "
                        "per-device memory and the bytes each device sends per call (= per layer per step)")
    p.add_argument("--layout", default="zigzag", metavar="NAME",
                   help="ring / all_gather: token layout over the devices, zigzag or contiguous (default: zigzag)")
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
            raise UsageError(f"{flag}: {item!r} is not an integer; give comma-separated positive integers, "
                             f"e.g. {flag} 1024,2048,4096") from None
        if value <= 0:
            raise UsageError(f"{flag}: {value} is not positive; give comma-separated positive integers, "
                             f"e.g. {flag} 1024,2048,4096")
        values.append(value)
    return tuple(values)


def parse_name_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _saver(paths):
    from jaxctx.bench import report

    def save_partial(result: dict) -> None:
        if paths:  # keep finished rows on disk: a long sweep killed at its longest T loses only that row
            report.write_json(paths["json"], result)

    return save_partial


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _finish(result: dict, paths) -> None:
    from jaxctx.bench import report

    print(report.format_report(result))
    if paths:
        written = report.save(result, paths["json"])
        print("wrote " + ", ".join(str(p) for p in written.values()))


def run_attention(args: argparse.Namespace) -> int:
    """`jaxctx bench attention`: validate everything, run the sweep, print the table, save the files."""
    from jaxctx.bench import report
    from jaxctx.bench.attention import AttentionBenchConfig, run_attention_bench

    cfg = AttentionBenchConfig(
        seq_lens=parse_int_list(args.seq_lens, "--seq-lens"), impls=parse_name_list(args.impls),
        causal=args.causal, dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, block_q=args.block_q, block_k=args.block_k, repeats=args.repeats,
        warmup=args.warmup, max_temp_gb=args.max_temp_gb, matmul_size=args.matmul_size,
        trace_dir=args.trace_dir, trace_steps=args.trace_steps, sequence=args.sequence, layout=args.layout,
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
        written = report.save(result, paths["json"])
        print("wrote " + ", ".join(str(p) for p in written.values()))
    errors = [r for r in result["rows"] if r["status"].startswith("error")]
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------------------
# bench train
# ----------------------------------------------------------------------------------------------------------

def _register_train(kinds, common: argparse.ArgumentParser) -> None:
    from jaxctx.config import REMAT_POLICIES

    p = kinds.add_parser(
        "train", parents=[common, _config_flags()],
        help="the real train step of a config across sequence lengths: step time, tokens/s, MFU, memory",
        description="Compile and run a config's jitted train step (the one train.py runs) at each sequence length "
                    "on a synthetic batch: median step time, tokens/s, MFU by 6N + 12*L*H*Q*T model FLOPs per "
                    "token (attention halved when causal; see docs/benchmarks.md), compiled memory per device. Tokens "
                    "per step are held constant by scaling the batch unless --batch is given.")
    p.add_argument("--seq-lens", required=True, metavar="T,T,...", help="comma-separated sequence lengths")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                      help="constant tokens per step: batch = N / T (default: longest T x data-parallel size)")
    size.add_argument("--batch", type=int, default=None, metavar="B",
                      help="fixed global batch at every T instead (tokens per step then grow with T)")
    p.add_argument("--block-sizes", default=None, metavar="N,...",
                   help="sweep model.attention_block_q = attention_block_k over these")
    p.add_argument("--remat-policies", default=None, metavar="NAME,...",
                   help=f"sweep model.remat_policy over these ({', '.join(REMAT_POLICIES)})")
    p.add_argument("--compare-hf", action="store_true",
                   help="gpt2 only: also time Hugging Face GPT2LMHeadModel (PyTorch CPU, sdpa, AdamW, random init) "
                        "on the same [B, T] and report our speed-up")
    p.add_argument("--matmul-size", type=int, default=None, metavar="N",
                   help="n of the n x n matmul measured as the CPU peak (default: 2048 on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, trace --trace-steps steps and break the op time down by HLO category "
                        "(matmul, copy/layout, reduce, elementwise, ...) with the most expensive ops")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """`jaxctx bench train`: validate, run the sweep, print the table, save the files."""
    from jaxctx.bench import report, step_profile
    from jaxctx.bench.train import TrainBenchConfig, run_train_bench

    cfg = TrainBenchConfig(
        config=args.config, overrides=tuple(args.overrides), seq_lens=parse_int_list(args.seq_lens, "--seq-lens"),
        tokens_per_step=args.tokens_per_step, batch=args.batch,
        block_sizes=None if args.block_sizes is None else parse_int_list(args.block_sizes, "--block-sizes"),
        remat_policies=parse_name_list(args.remat_policies), repeats=args.repeats, warmup=args.warmup,
        devices=args.devices, max_temp_gb=args.max_temp_gb, matmul_size=args.matmul_size,
        compare_hf=args.compare_hf, trace_dir=args.trace_dir, trace_steps=args.trace_steps, profile=args.profile,
    ).validated()
    paths = report.output_paths(args.out) if args.out else None
    result = run_train_bench(cfg, progress=_progress, on_row=_saver(paths))
    _finish(result, paths)
    for row in result["rows"]:
        if row.get("profile"):
            print(f"\n{row['variant']} T={row['seq_len']} B={row['batch']}: "
                  + step_profile.format_breakdown(row["profile"], row.get("step_ms")))
    return 1 if any(r["status"].startswith("error") for r in result["rows"]) else 0


# ----------------------------------------------------------------------------------------------------------
# bench max-context
# ----------------------------------------------------------------------------------------------------------

def _register_max_context(kinds, common: argparse.ArgumentParser) -> None:
    from jaxctx.config import REMAT_POLICIES

    p = kinds.add_parser(
        "max-context", parents=[_config_flags()],
        help="longest sequence whose train step fits a memory budget: vanilla vs memory-efficient vs blockwise",
        description="For each variant (vanilla: materialised attention, whole MLP and loss; memory_efficient: "
                    "blockwise attention only; blockwise: blockwise attention + chunked MLP + chunked loss), find "
                    "the longest T whose compiled train step fits --budget-gb per device (arguments + outputs - "
                    "aliased + temp), by doubling then bisection. Ahead-of-time compilation only: nothing runs.")
    p.add_argument("--budget-gb", type=float, required=True, metavar="GIB", help="memory budget per device, GiB")
    p.add_argument("--variants", default=",".join(("vanilla", "memory_efficient", "blockwise")), metavar="NAME,...",
                   help="comma-separated variants (default: vanilla,memory_efficient,blockwise)")
    p.add_argument("--remat-policy", default=None, choices=REMAT_POLICIES,
                   help="remat policy shared by every variant (default: the config's)")
    p.add_argument("--mlp-chunk", type=int, default=None, metavar="N",
                   help="blockwise variant's model.mlp_chunk (default: the config's, else 2048)")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                   help="blockwise variant's model.loss_chunk (default: the config's, else 2048)")
    p.add_argument("--granularity", type=int, default=512, metavar="N",
                   help="lengths probed are multiples of N (default: 512)")
    p.add_argument("--start", type=int, default=1024, metavar="T", help="first length probed (default: 1024)")
    p.add_argument("--limit", type=int, default=1 << 22, metavar="T",
                   help="longest length probed (default: 4194304)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="global batch (default: one sequence per data-parallel device)")
    p.add_argument("--buffers", type=int, default=0, metavar="N",
                   help="also list each variant's N largest temp buffers at its max length (XLA buffer report)")
    p.add_argument("--sequence", default=None, metavar="N,...",
                   help="context parallelism: search the blockwise variant with each sequence split over N devices "
                        "(parallel.sequence=N, ring attention), e.g. 1,2,4,8; plots max T against N")
    p.add_argument("--out", metavar="FILE.json", help="save results to FILE.json, plus FILE.csv and FILE.png")
    p.set_defaults(func=run_max_context)


def run_max_context(args: argparse.Namespace) -> int:
    from jaxctx.bench import report
    from jaxctx.bench.max_context import MaxContextConfig, run_max_context as run

    mc = MaxContextConfig(
        config=args.config, budget_gb=args.budget_gb, overrides=tuple(args.overrides),
        variants=parse_name_list(args.variants) or (), remat_policy=args.remat_policy, mlp_chunk=args.mlp_chunk,
        loss_chunk=args.loss_chunk, granularity=args.granularity, start=args.start, limit=args.limit,
        batch=args.batch, devices=args.devices, buffers=args.buffers,
        sequence=parse_int_list(args.sequence, "--sequence") if args.sequence else (),
    ).validated()
    paths = report.output_paths(args.out) if args.out else None
    result = run(mc, progress=_progress, on_row=_saver(paths))
    _finish(result, paths)
    return 0


# ----------------------------------------------------------------------------------------------------------
# plan (a top-level command)
# ----------------------------------------------------------------------------------------------------------

def _register_generate(kinds, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "generate", parents=[common, _config_flags()],
        help="KV-cache generation: prefill and decode tokens/s beside transformers' generate (gpt2)",
        description="Greedy generation of exactly --new-tokens tokens per row on a random GPT-2 of the config's "
                    "shapes, the same weights in transformers (PyTorch CPU, sdpa, its KV cache): prefill tokens/s, "
                    "decode tokens/s (total - prefill), whether the tokens agree. See docs/benchmarks.md.")
    p.add_argument("--batches", default="1", metavar="B,...", help="batch sizes (default 1)")
    p.add_argument("--prompts", required=True, metavar="T,...", help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N", help="tokens generated per row (default 128)")
    p.add_argument("--no-hf", dest="compare_hf", action="store_false", help="skip the transformers side")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """`jaxctx bench generate`: validate, run the sweep, print the table, save the files."""
    from jaxctx.bench import report
    from jaxctx.bench.generate import GenerateBenchConfig, run_generate_bench

    cfg = GenerateBenchConfig(
        config=args.config, overrides=tuple(args.overrides), batches=parse_int_list(args.batches, "--batches"),
        prompts=parse_int_list(args.prompts, "--prompts"), new_tokens=args.new_tokens, repeats=args.repeats,
        warmup=args.warmup, compare_hf=args.compare_hf).validated()
    paths = report.output_paths(args.out) if args.out else None
    result = run_generate_bench(cfg, progress=_progress, on_row=_saver(paths))
    _finish(result, paths)
    return 0


def _register_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", parents=[_config_flags()],
        help="memory breakdown of one config's train step per device, and whether it fits",
        description="Compile a config's train step ahead of time (nothing is allocated) and print its memory per "
                    "device: params, optimizer state, batch, temp (activations, gradients, optimizer "
                    "temporaries), total; and whether it fits the device (CPU: host RAM). Exit code 1 if not.")
    p.add_argument("--buffers", type=int, default=0, metavar="N",
                   help="also list the N largest temp buffers (XLA buffer assignment report)")
    p.add_argument("--out", metavar="FILE.json", help="also write FILE.json and FILE.csv (one row per component)")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from jaxctx.bench import report
    from jaxctx.bench.plan import format_plan, run_plan as plan

    paths = report.output_paths(args.out) if args.out else None
    result = plan(args.config, tuple(args.overrides), devices=args.devices, buffers=args.buffers)
    print(format_plan(result))
    if paths:
        report.write_json(paths["json"], result)
        report.write_csv(paths["csv"], result)
        print(f"wrote {paths['json']}, {paths['csv']}")
    return 0 if result["fits"] in (True, None) else 1


def _register_finetune_context(kinds, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "finetune-context",
        help="task accuracy against data.seq_len: same model, init and steps at every length (trained on CPU)",
        description="Fine-tune the same classifier from scratch at each --seq-lens (one example per row, "
                    "model.max_positions = the largest length, same steps and batch), predict the validation "
                    "split and report accuracy / macro-F1 per length. See docs/finetuning.md.")
    p.add_argument("--config", default="configs/finetune-stdlib-package.yaml", metavar="FILE",
                   help="base task config (default: configs/finetune-stdlib-package.yaml)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="task directory with train.jsonl and validation.jsonl (jaxctx data make-task)")
    p.add_argument("--seq-lens", default="256,1024,4096", metavar="T,...", help="context lengths (default 256,1024,4096)")
    p.add_argument("--steps", type=int, default=40, metavar="N", help="train steps at every length (default 40)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="examples per step (default 4)")
    p.add_argument("--warmup-steps", type=int, default=5, metavar="N", help="learning-rate warmup (default 5)")
    p.add_argument("--workdir-root", required=True, metavar="DIR", help="empty directory for the runs (DIR/seqT)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override applied at every length (repeatable)")
    p.add_argument("--out", metavar="FILE.json", help="save results to FILE.json, plus FILE.csv and FILE.png")
    p.set_defaults(func=run_finetune_context)


def run_finetune_context(args: argparse.Namespace) -> int:
    """`jaxctx bench finetune-context`: run the sweep, print one line per length, save the files."""
    from jaxctx.bench import report
    from jaxctx.bench.finetune_context import run

    if args.out:
        report.output_paths(args.out)  # a bad --out fails before any training
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    run(parse_int_list(args.seq_lens, "--seq-lens"), config=args.config, data_dir=args.data,
        workdir_root=args.workdir_root, steps=args.steps, batch_size=args.batch_size,
        warmup_steps=args.warmup_steps, overrides=list(args.overrides), out=args.out)
    if args.out:
        print(f"wrote {args.out} (+ .csv, .png)")
    return 0


_BENCHES = (_register_attention, _register_train, _register_max_context, _register_generate,
            _register_finetune_context)
