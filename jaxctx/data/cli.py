"""`jaxctx data inspect`, `jaxctx data make-task` and `jaxctx tokenizer train`.

    jaxctx data inspect --config configs/x.yaml --set data.seq_len=1024 --batches 20 [--json]
    jaxctx data make-task stdlib-package --out data/stdlib-package
    jaxctx tokenizer train --data 'corpus/*.txt' --vocab-size 8192 --out tokenizers/corpus-8k

Importing this module stays cheap (argparse only); the pipeline is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    """Add the `data` and `tokenizer` command groups."""
    data = subparsers.add_parser("data", help="inspect the input pipeline")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    inspect = data_sub.add_parser("inspect", help="build the configured pipeline and report a few batches",
                                  description="Builds the pipeline of a config and prints, per batch, the shape, "
                                              "documents per sequence, padding fraction and tokens/s.")
    inspect.add_argument("--config", help="experiment YAML (default: the built-in defaults)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. data.seq_len=1024 (repeatable)")
    inspect.add_argument("--batches", type=_positive_int, default=10, help="batches to build (default 10)")
    inspect.add_argument("--split", choices=("train", "validation"), default="train")
    inspect.add_argument("--process-index", type=int, default=0, help="simulate this process of a multi-host job")
    inspect.add_argument("--process-count", type=_positive_int, default=1, help="simulated number of processes")
    inspect.add_argument("--json", action="store_true", help="end with one JSON line of summary numbers")
    inspect.set_defaults(func=inspect_command)
    make = data_sub.add_parser("make-task", help="write an offline labelled task from the stdlib sources as JSONL",
                               description="Writes train.jsonl, validation.jsonl and task.json for a labelled "
                                           "task built from the Python standard library's sources: "
                                           "stdlib-package (classify a file's package from its masked text) or "
                                           "stdlib-tokens (tag each word with its Python token class, BIO).")
    make.add_argument("name", choices=("stdlib-package", "stdlib-tokens"), help="the task to write")
    make.add_argument("--out", required=True, help="output directory (must be empty or new without --force)")
    make.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    make.set_defaults(func=make_task_command)

    tok = subparsers.add_parser("tokenizer", help="train tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    tok_sub.required = True
    train = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer that AutoTokenizer loads",
                               description="Trains byte-level BPE with Hugging Face tokenizers on the train "
                                           "split of a source and saves a directory for data.tokenizer.")
    train.add_argument("--data", required=True,
                       help="'stdlib', a file, glob or directory, or hub:NAME (same as data.source)")
    train.add_argument("--vocab-size", type=_positive_int, required=True, help="target vocabulary size")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--format", choices=("text", "json", "parquet"), help="default: from the file extension")
    train.add_argument("--text-field", default="text", help="json/parquet column holding the text")
    train.add_argument("--text-unit", choices=("document", "paragraph", "line"), default="document",
                       help="text files: what one document is")
    train.add_argument("--max-documents", type=int, default=0, help="train on at most this many (0 = all)")
    train.add_argument("--min-frequency", type=_positive_int, default=2, help="minimum count of a merged pair")
    train.add_argument("--cache-dir", help="datasets cache directory (default: HF_DATASETS_CACHE)")
    train.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    train.set_defaults(func=tokenizer_train_command)


def inspect_command(args) -> int:
    """Build the pipeline of `--config`, take `--batches` batches, print per-batch and summary numbers."""
    import numpy as np

    from jaxctx import config as config_lib
    from jaxctx.data.pipeline import build_iterator

    cfg = config_lib.load(args.config, args.set)
    start = time.perf_counter()
    # build_iterator checks the tokenizer's vocabulary against model.vocab_size before reading any data.
    it = build_iterator(cfg, args.split, process_index=args.process_index, process_count=args.process_count)
    stats = it.stats()
    print(f"source {stats['source']} ({args.split}, process {args.process_index}/{args.process_count}): "
          f"{stats['documents'] if stats['documents'] is not None else '?'} documents, "
          f"{stats['corpus_tokens'] if stats['corpus_tokens'] is not None else '?'} tokens, "
          f"tokenizer {stats['tokenizer']} (vocab {stats['vocab_size']} <= model.vocab_size "
          f"{cfg.model.vocab_size}), prepared in {stats['prepare_s']:.2f} s "
          f"(tokenize {stats['tokenize_s']:.2f} s)")
    docs_per_row, scored = [], []
    for i in range(args.batches):
        t0 = time.perf_counter()
        batch = next(it)
        dt = time.perf_counter() - t0
        seg = batch["segment_ids"]
        docs = seg.max(axis=1).mean()  # segments are numbered 1..n in each row
        docs_per_row.append(docs)
        # scored tokens (LM, tagging) or, for sequence classification, filled example slots of [B, E]
        scored.append(batch["loss_mask" if "loss_mask" in batch else "label_mask"].mean())
        print(f"batch {i}: shape {list(seg.shape)}  docs/seq {docs:.2f}  padding {np.mean(seg == 0):.2%}  "
              f"scored {scored[-1]:.2%}  {dt * 1e3:.1f} ms  {seg.size / dt / 1e6:.2f} M tokens/s")
    stats = it.stats()
    total_s = time.perf_counter() - start
    summary = {
        "batches": stats["batches"],
        "batch_shape": stats["batch_shape"],
        "padding_fraction": stats["padding_fraction"],
        "tokens_per_sec": stats["tokens_per_sec"],  # steady state: batch building only
        "end_to_end_tokens_per_sec": stats["tokens"] / total_s,  # including loading and tokenization
        "docs_per_sequence": float(np.mean(docs_per_row)),
        "scored_fraction": float(np.mean(scored)),
        "prepare_s": stats["prepare_s"],
        "tokenize_s": stats["tokenize_s"],
        "documents": stats["documents"],
        "corpus_tokens": stats["corpus_tokens"],
        "rows_per_epoch": stats["rows_per_epoch"],
        "invalid_utf8_bytes": stats["invalid_utf8_bytes"],
        "vocab_size": stats["vocab_size"],
        "model_vocab_size": cfg.model.vocab_size,
        "tokenizer": stats["tokenizer"],
        "source": stats["source"],
        "split": args.split,
        "seq_len": cfg.data.seq_len,
        "family": cfg.model.family,
    }
    for key in ("examples", "truncated_examples", "packing_efficiency", "examples_per_row"):  # labelled data
        if key in stats:
            summary[key] = stats[key]
    print(f"{summary['batches']} batches: padding {summary['padding_fraction']:.2%}, "
          f"{summary['docs_per_sequence']:.2f} docs/seq, {summary['tokens_per_sec'] / 1e6:.1f} M packed tokens/s "
          f"({summary['end_to_end_tokens_per_sec'] / 1e6:.2f} M tokens/s including setup)")
    if args.json:
        print(json.dumps(summary))
    return 0


def make_task_command(args) -> int:
    """Write the offline task `args.name` into `args.out` and print its counts."""
    from jaxctx.data.stdlib_tasks import make_task

    start = time.perf_counter()
    summary = make_task(args.name, args.out, force=args.force)
    sizes = {split: sum(c.values()) if args.name == "stdlib-package" else c["examples"]
             for split, c in summary["counts"].items()}
    print(f"wrote {args.name} to {args.out} in {time.perf_counter() - start:.1f} s: {sizes['train']} train and "
          f"{sizes['validation']} validation examples, {len(summary['labels'])} labels "
          f"({', '.join(summary['labels'])}); see {os.path.join(args.out, 'task.json')}")
    return 0


def tokenizer_train_command(args) -> int:
    """Train byte-level BPE on the train split of `--data` and save it to `--out`."""
    import dataclasses

    from jaxctx.config import DataConfig
    from jaxctx.data.bpe import train_bpe
    from jaxctx.data.errors import DataError
    from jaxctx.data.sources import load_documents

    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise DataError(f"--out {args.out} exists and is not empty; pass --force to overwrite")
    data_cfg = dataclasses.replace(DataConfig(), source=args.data, format=args.format, text_field=args.text_field,
                                   text_unit=args.text_unit, max_documents=args.max_documents,
                                   cache_dir=args.cache_dir)
    data_cfg.validate()
    start = time.perf_counter()
    # The train split only: the held-out documents stay unseen by the tokenizer too.
    docs = load_documents(data_cfg, "train")
    texts = (batch["text"] for batch in docs.dataset.iter(batch_size=256))
    hf = train_bpe(texts, args.vocab_size, args.out, min_frequency=args.min_frequency)
    sample = docs.dataset[:64]["text"]  # a dict of lists: the first 64 documents
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    n_tokens = sum(len(ids) for ids in hf(sample, add_special_tokens=False, verbose=False)["input_ids"])
    print(f"trained byte-level BPE on {len(docs.dataset)} documents of {docs.description} in "
          f"{time.perf_counter() - start:.1f} s: vocab {len(hf)}, {n_bytes / max(n_tokens, 1):.2f} bytes/token "
          f"(sample); saved to {args.out} (use data.tokenizer={args.out}, model.vocab_size>={len(hf)})")
    return 0
