"""`jaxctx convert from-hf` and `jaxctx convert to-hf`.

    jaxctx convert from-hf HF_DIR OUT_DIR [--force] [--max-positions N [--extend-positions tile|copy|interpolate]
                                                                       [--rope-scaling linear|yarn]]
    jaxctx convert to-hf CKPT_OR_WORKDIR OUT_DIR [--force] [--dtype float32|bfloat16|float16] [--shard-size 5GB]
                         [--step N] [--tokenizer DIR|byte]

Importing this module stays cheap (argparse only); the converter is imported when a command runs.
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    """Add the `convert` command group."""
    convert = subparsers.add_parser("convert", help="convert weights to and from Hugging Face safetensors")
    sub = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND")
    sub.required = True

    src = sub.add_parser(
        "from-hf", help="HF directory (config.json + safetensors) -> jaxctx checkpoint",
        description="Converts GPT2LMHeadModel, BertForMaskedLM or LlamaForCausalLM weights (safetensors, single or "
                    "sharded, f32/bf16/f16) into a params-only jaxctx checkpoint for train.init_from and to-hf. "
                    "PyTorch pickles (.bin/.pt) are refused, never unpickled.")
    src.add_argument("hf_dir", metavar="HF_DIR", help="directory written by save_pretrained")
    src.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to create")
    src.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    src.add_argument("--max-positions", type=_positive_int, metavar="N",
                     help="new context length: resizes the learned position table (gpt2, bert) or sets "
                          "max_position_embeddings (llama)")
    src.add_argument("--extend-positions", choices=("tile", "copy", "interpolate"),
                     help="how new position rows are made (gpt2, bert; default tile): tile repeats the table, copy "
                          "keeps it and initialises the new rows, interpolate stretches it")
    src.add_argument("--rope-scaling", choices=("linear", "yarn"),
                     help="llama: scale RoPE by N / the model's context so N positions map onto the trained ones "
                          "(linear: position interpolation; yarn: YaRN, high frequencies kept)")
    src.set_defaults(func=from_hf_command)

    dst = sub.add_parser(
        "to-hf", help="jaxctx checkpoint or training workdir -> HF directory",
        description="Writes config.json + safetensors that transformers' AutoModelForCausalLM / "
                    "AutoModelForMaskedLM load, from a checkpoint directory or the latest checkpoint of a "
                    "training workdir, with the tokenizer it was trained with (the byte tokenizer written as "
                    "tokenizer.json, or a tokenizer directory copied), generation_config.json and a README.md "
                    "model card.")
    dst.add_argument("src", metavar="CKPT_OR_WORKDIR", help="from-hf output, checkpoint root or training workdir")
    dst.add_argument("out_dir", metavar="OUT_DIR", help="HF directory to create")
    dst.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    dst.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="tensor dtype of the safetensors files (default float32)")
    dst.add_argument("--shard-size", default="5GB",
                     help="largest safetensors file before sharding, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    dst.add_argument("--step", type=int, help="checkpoint step to export (default: the latest)")
    dst.add_argument("--tokenizer", metavar="DIR",
                     help="tokenizer to ship: a tokenizer directory or 'byte' (default: the one the checkpoint "
                          "was trained with, data.tokenizer)")
    dst.set_defaults(func=to_hf_command)


def _quiet_orbax() -> None:
    # Orbax logs read-only and partial-restore notices on every params-only load; they are expected here.
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def _task(m) -> str:
    """' sequence_classification (3 labels)' for a task model, '' for a language model."""
    if m.task == "lm":
        return " + next-sentence head" if m.nsp_head else ""
    return f" {m.task} ({m.num_labels} label{'s' if m.num_labels != 1 else ''})"


def from_hf_command(args) -> int:
    from jaxctx.convert.api import import_checkpoint

    _quiet_orbax()
    report = import_checkpoint(args.hf_dir, args.out_dir, force=args.force, max_positions=args.max_positions,
                               extend_positions=args.extend_positions, rope_scaling=args.rope_scaling)
    m = report["config"].model
    print(f"from-hf: {m.family}{_task(m)} {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, vocab "
          f"{m.vocab_size}, max_positions {m.max_positions}, {report['params'] / 1e6:.2f}M params -> "
          f"{report['out_dir']} (jaxctx checkpoint, step 0)")
    side = report["side_files"]
    print(f"  carried: {', '.join(side) if side else 'no tokenizer files found'} (in hf_files/)")
    print(f"  train from it: python train.py --config {report['out_dir']}/config.yaml "
          f"--set train.init_from={report['out_dir']} --set data.source=...")
    return 0


def to_hf_command(args) -> int:
    from jaxctx.convert.api import export_checkpoint

    _quiet_orbax()
    report = export_checkpoint(args.src, args.out_dir, force=args.force, dtype=args.dtype,
                               shard_size=args.shard_size, step=args.step, tokenizer=args.tokenizer)
    m = report["config"].model
    print(f"to-hf: {m.family}{_task(m)} step {report['step']} ({report['params'] / 1e6:.2f}M params, {args.dtype}, "
          f"max_positions {m.max_positions}) -> {report['out_dir']}: {', '.join(report['files'])}")
    tokenizer = report["tokenizer_dir"]
    if tokenizer is None:
        print("  no tokenizer files found with the checkpoint; add the model's tokenizer to OUT_DIR (or pass "
              "--tokenizer DIR)")
    else:
        print(f"  tokenizer: {'the jaxctx byte tokenizer' if tokenizer == 'byte' else tokenizer}; load it with "
              f"transformers.pipeline(..., model='{report['out_dir']}')")
    return 0
