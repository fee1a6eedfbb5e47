"""`jaxctx eval` (perplexity + per-position loss), `jaxctx eval passkey`, `jaxctx fill-mask`, `jaxctx predict`.

    jaxctx eval --checkpoint DIR|--hf DIR --data SOURCE --seq-len T [--stride S] [--out FILE.json]
                [--label NAME] [--compare [NAME=]EARLIER.json ...]
    jaxctx eval passkey --checkpoint DIR|--hf DIR --lengths 1024,4096 [--depths 0,0.5,1] [--trials N] [--out F.json]
    jaxctx fill-mask --checkpoint DIR|--hf DIR --text "Paris is the [MASK] of France." [--top-k 5]
    jaxctx predict --checkpoint WORKDIR --data FILE --out preds.jsonl [--batch-size 8] [--force]

--out FILE.json also writes FILE.csv and FILE.png beside it (an existing FILE.json is kept unless --force).
Importing this module stays cheap (argparse only).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from jaxctx.errors import UsageError
from jaxctx.generate.cli import _positive_int, add_model_arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers like 1024,4096; got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated depths in [0, 1] like 0,0.5,1; got {text!r}")
    return values


def _add_out(parser) -> None:
    parser.add_argument("--out", metavar="FILE.json", help="write JSON here, and the CSV and PNG beside it")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def register(subparsers) -> None:
    """Add the `eval`, `fill-mask` and `predict` commands."""
    pr = subparsers.add_parser(
        "predict", help="a fine-tuned task model's labels / probabilities / entity spans for each example of a file",
        description="Encodes the file's examples as training did (text [+ pair] or tokens; labels optional) and "
                    "writes one JSONL row per example: the label and class probabilities, or per-word tags and "
                    "entity spans. Prints the task metrics too when the file has labels.")
    pr.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="training workdir, WORKDIR/best, or a checkpoint root (latest step)")
    pr.add_argument("--data", required=True, metavar="FILE", help="JSON/JSONL, CSV or parquet file (or glob/dir)")
    pr.add_argument("--out", required=True, metavar="PREDS.jsonl", help="output JSONL")
    pr.add_argument("--batch-size", type=_positive_int, default=8, help="packed rows per forward pass (default 8)")
    pr.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    pr.add_argument("--force", action="store_true", help="replace an existing --out")
    pr.set_defaults(func=predict_command)
    ev = subparsers.add_parser(
        "eval", help="perplexity and per-position loss over a corpus; `eval passkey` for retrieval",
        description="Sliding-window perplexity (transformers' method: windows of --seq-len every --stride tokens, "
                    "each scoring only new targets) and the mean loss by context position in log-spaced buckets.")
    add_model_arguments(ev, required=False)  # not required here: `eval passkey` takes its own
    ev.add_argument("--data", metavar="SOURCE", help="stdlib, a file/glob/directory, or hub:NAME (as data.source)")
    ev.add_argument("--seq-len", type=_positive_int, metavar="T", help="window length in tokens")
    ev.add_argument("--stride", type=_positive_int, metavar="S", help="window step (default: seq-len)")
    ev.add_argument("--split", choices=("all", "train", "validation"), default="all",
                    help="which documents of the source (train/validation: the training split by hash)")
    ev.add_argument("--max-documents", type=int, default=0, metavar="N", help="use at most N documents (0 = all)")
    ev.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass (default 4)")
    _add_out(ev)
    ev.add_argument("--label", help="this run's name in the plot's legend (default: the checkpoint's name)")
    ev.add_argument("--compare", action="append", default=[], metavar="[NAME=]FILE.json",
                    help="also draw the per-position loss of an earlier `jaxctx eval --out` (repeatable), e.g. "
                         "before=base.json, to show a change such as a context extension")
    ev.set_defaults(func=eval_command)
    sub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy by prompt length and needle depth",
                        description="A 5-digit key hidden at each depth of filler text of each length; the greedy "
                                    "continuation of the question must start with it.")
    add_model_arguments(pk)
    pk.add_argument("--lengths", type=_int_list, required=True, help="prompt lengths in tokens, e.g. 1024,4096")
    pk.add_argument("--depths", type=_depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="relative needle depths (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=_positive_int, default=5, help="keys per (length, depth) (default 5)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    pk.add_argument("--batch-size", type=_positive_int, default=4, help="prompts decoded together (default 4)")
    _add_out(pk)
    pk.set_defaults(func=passkey_command)

    fm = subparsers.add_parser("fill-mask", help="top-k tokens for each [MASK] with a BERT checkpoint",
                               description="Scores equal transformers' fill-mask pipeline on the same weights.")
    add_model_arguments(fm)
    fm.add_argument("--text", required=True, help='text with one or more masks, e.g. "Paris is the [MASK]."')
    fm.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    fm.add_argument("--json", action="store_true", help="print one JSON list (per mask, the candidates)")
    fm.set_defaults(func=fill_mask_command)


def _check_out(args):
    """{"json", "csv", "png"} paths of --out (None without it), refused before any work if they would clobber."""
    if args.out is None:
        return None
    from jaxctx.bench.report import output_paths

    paths = output_paths(args.out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.force:
        raise UsageError(f"--out {args.out}: {', '.join(existing)} exists; pass --force to replace")
    if not paths["json"].parent.is_dir():
        raise UsageError(f"--out {args.out}: directory {paths['json'].parent} does not exist")
    return paths


def _save(paths, result: dict, plot) -> None:
    from jaxctx.bench.report import write_csv, write_json

    write_json(paths["json"], result)
    write_csv(paths["csv"], result)
    plot(paths["png"])


def corpus_stream(model, source: str, split: str, max_documents: int):
    """The source's documents tokenized and joined with the separator (as training packs them) -> ids [N]."""
    import dataclasses

    import numpy as np

    from jaxctx.data.sources import load_documents

    data = dataclasses.replace(model.cfg.data, source=source, max_documents=max_documents, streaming=False,
                               validation_fraction=0.0 if split == "all" else model.cfg.data.validation_fraction)
    data.validate()
    import datasets

    datasets.disable_progress_bars()  # the command prints its own summary; bars would interleave with it
    docs = load_documents(data, "train" if split == "all" else split).dataset
    texts = docs["text"]
    separator = model.tokenizer.special.separator(model.cfg.model.causal)
    pieces = []
    for start in range(0, len(texts), 256):
        for ids in model.tokenizer.encode_batch(texts[start:start + 256]):
            pieces += [ids, np.asarray([separator], np.int32)]
    return np.concatenate(pieces).astype(np.int32), len(texts)


def _read_compared(specs: list[str]) -> dict[str, list[dict]]:
    """--compare [NAME=]FILE.json -> {name: per-position rows} of earlier `jaxctx eval --out` files."""
    curves = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as err:
            raise UsageError(f"--compare {spec}: cannot read {path} ({err.strerror})") from None
        except ValueError:
            raise UsageError(f"--compare {spec}: {path} is not JSON") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not (isinstance(data, dict) and data.get("kind") == "eval" and isinstance(rows, list)
                and all(isinstance(r, dict) and {"context_to", "mean_loss"} <= r.keys() for r in rows)):
            raise UsageError(f"--compare {spec}: {path} is not the JSON of `jaxctx eval --out`")
        curves[name or os.path.splitext(os.path.basename(path))[0]] = rows
    return curves


def eval_command(args) -> int:
    from jaxctx import models
    from jaxctx.evaluate import plots
    from jaxctx.evaluate.perplexity import evaluate_stream
    from jaxctx.generate import loading

    if args.data is None or args.seq_len is None:
        raise UsageError("jaxctx eval needs --data SOURCE and --seq-len T (or the subcommand: jaxctx eval passkey)")
    paths = _check_out(args)
    if (args.compare or args.label) and paths is None:
        raise UsageError("--compare and --label draw into the --out plot; pass --out FILE.json too")
    earlier = _read_compared(args.compare)
    model = loading.load(args.checkpoint, args.hf, tokenizer=args.tokenizer, step=args.step,
                         families=("gpt2", "llama"), command="eval")
    stride = args.stride or args.seq_len
    if stride > args.seq_len:
        raise UsageError(f"--stride {stride} must be <= --seq-len {args.seq_len}")
    limit = model.cfg.model.positions
    if args.seq_len > limit and model.cfg.model.family == "gpt2":
        raise UsageError(f"--seq-len {args.seq_len} exceeds model.max_positions={limit} (the learned position table)")
    stream, documents = corpus_stream(model, args.data, args.split, args.max_documents)
    start = time.perf_counter()
    import dataclasses

    eval_cfg = dataclasses.replace(model.cfg.model, remat_policy="none", remat_group_size=0)
    result = evaluate_stream(models.build(eval_cfg), model.params, stream, args.seq_len, stride,
                             batch_size=args.batch_size, pad_id=model.tokenizer.special.padding(True))
    seconds = time.perf_counter() - start
    print(f"perplexity {result.perplexity:.4f}  mean loss {result.mean_loss:.4f}  ({result.tokens_scored} tokens "
          f"scored in {result.windows} windows of {args.seq_len}, stride {stride}; {documents} documents; "
          f"{seconds:.1f} s)")
    for row in result.per_position:
        if row["mean_loss"] is not None:
            print(f"  context {row['context_from']:>6}-{row['context_to']:<6} loss {row['mean_loss']:.4f}  "
                  f"({row['tokens']} tokens)")
    if paths is not None:
        summary = {k: v for k, v in result.to_dict().items() if k != "per_position"}
        out = {"kind": "eval", "checkpoint": model.source, "step": model.step, "data": args.data,
               "seq_len": args.seq_len, "stride": stride, "documents": documents, **summary,
               "rows": result.per_position}
        title = f"{os.path.basename(model.source)} on {args.data}: ppl {result.perplexity:.3g}, T={args.seq_len}"
        name = args.label or os.path.basename(os.path.normpath(model.source))
        curves = {**earlier, name: result.per_position}
        _save(paths, out, lambda p: plots.plot_position_loss(p, curves, title))
        print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


def passkey_command(args) -> int:
    from jaxctx.evaluate import passkey, plots
    from jaxctx.generate import loading
    from jaxctx.generate.generator import Generator
    from jaxctx.generate.settings import GenerationSettings

    paths = _check_out(args)
    model = loading.load(args.checkpoint, args.hf, tokenizer=args.tokenizer, step=args.step,
                         families=("gpt2", "llama"), command="eval passkey")
    try:
        prompts = passkey.make_prompts(model.encode, args.lengths, args.depths, args.trials, args.seed)
    except ValueError as err:
        raise UsageError(f"--lengths: {err}") from None
    eos = model.tokenizer.special.eos
    settings = GenerationSettings(max_new_tokens=8, eos_ids=() if eos is None else (eos,),
                                  pad_id=model.tokenizer.special.padding(True))
    generator = Generator(model.cfg, model.params)
    for p in prompts:  # refuse lengths the model cannot hold before decoding anything
        generator.check_prompt(p.ids, settings, f"--lengths {p.length}")
    start = time.perf_counter()
    completions = []
    for length in args.lengths:  # one batch shape per length
        group = [p for p in prompts if p.length == length]
        done = generator.generate([p.ids for p in group], settings, batch_size=args.batch_size)
        completions += [model.decode(c.token_ids) for c in done]
    table = passkey.accuracy_table(prompts, completions)
    total = sum(r["correct"] for r in table) / sum(r["trials"] for r in table)
    print(f"passkey accuracy {total:.1%} over {len(prompts)} prompts ({time.perf_counter() - start:.1f} s)")
    for row in table:
        print(f"  length {row['length']:>7}  depth {row['depth']:<5g} {row['correct']}/{row['trials']}")
    if paths is not None:
        out = {"kind": "passkey", "checkpoint": model.source, "step": model.step, "accuracy": total,
               "trials": args.trials, "seed": args.seed, "rows": table}
        title = f"passkey retrieval: {os.path.basename(model.source)} ({args.trials} keys per cell)"
        _save(paths, out, lambda p: plots.plot_passkey(p, table, title))
        print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


def fill_mask_command(args) -> int:
    from jaxctx.evaluate.fill_mask import fill_mask
    from jaxctx.generate import loading

    model = loading.load(args.checkpoint, args.hf, tokenizer=args.tokenizer, step=args.step, families=("bert",),
                         command="fill-mask")
    results = fill_mask(model, args.text, args.top_k)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    for i, candidates in enumerate(results):
        print(f"mask {i + 1}:")
        for c in candidates:
            print(f"  {c['score']:.4f}  {c['token_str']!r:<16} {c['sequence']}")
    return 0


def predict_command(args) -> int:
    """Write a task model's predictions for each example of --data to --out (jaxctx.evaluate.predict)."""
    from jaxctx.evaluate.predict import predict

    predict(args.checkpoint, args.data, args.out, batch_size=args.batch_size, force=args.force, step=args.step)
    return 0
