"""`jaxctx generate`: text from a gpt2 / llama checkpoint or HF directory.

    jaxctx generate --checkpoint DIR|--hf HF_DIR --prompt TEXT | --prompts IN.jsonl [--out OUT.jsonl]
                    [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S] [--num-beams B]
                    [--mesh data=2,fsdp=2,tensor=2]

One --prompt streams the completion to the terminal as it is decoded. --prompts reads JSONL rows with a
"prompt" field and writes one row per prompt ({"prompt", "completion", "token_ids", "finish_reason"}) to --out,
or to stdout; with --out nothing but the rows goes to the file (written to a temp file, then moved in place;
an existing file is kept unless --force). Importing this module stays cheap (argparse only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxctx.convert.cli import _positive_int
from jaxctx.errors import UsageError


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--checkpoint | --hf, --tokenizer, --step: how every inference command finds its model."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--checkpoint", metavar="DIR", help="training workdir or jaxctx checkpoint (latest step)")
    source.add_argument("--hf", metavar="HF_DIR", help="Hugging Face directory (config.json + safetensors)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory or 'byte' (default: the model's)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")


def register(subparsers) -> None:
    """Add the `generate` command."""
    p = subparsers.add_parser(
        "generate", help="generate text with a gpt2/llama checkpoint (KV cache; greedy, sampling, beam search)",
        description="Greedy decoding by default, as transformers' generate. --temperature/--top-k/--top-p turn "
                    "sampling on; --num-beams > 1 is beam search. Rows stop at the tokenizer's EOS, a --stop-id, "
                    "or --max-new-tokens.")
    add_model_arguments(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt (its completion streams to the terminal)")
    prompts.add_argument("--prompts", metavar="IN.jsonl", help="JSONL file, one {\"prompt\": TEXT} per line")
    p.add_argument("--out", metavar="OUT.jsonl", help="write the result rows here (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="default 32")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sample from softmax(logits / T); 0 = greedy (the default)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set with probability >= P")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="CTRL penalty (default 1)")
    p.add_argument("--num-beams", type=int, default=1, metavar="B", help="beam search with B beams (default 1)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length ** this (default 1)")
    p.add_argument("--stop-id", type=int, action="append", default=[], metavar="ID",
                   help="another token id that ends a row (finish_reason 'stop'); repeatable")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="decode on a device mesh, as training's parallel.data/fsdp/tensor (e.g. data=2,tensor=2; "
                        "data defaults to -1 = the devices left): params sharded as trained, batch over data x fsdp")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--truncate", choices=("error", "left"), default="error",
                   help="a prompt too long for the model's positions: refuse (default) or keep its end")
    p.set_defaults(func=generate_command)


MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=2' -> {"data": 2, "tensor": 2}: the `parallel.*` mesh sizes of a training config."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in MESH_AXES or not size.strip().lstrip("-").isdigit() or int(size) == 0 or int(size) < -1:
            raise UsageError(f"--mesh {text}: {part!r} is not AXIS=N with AXIS one of {', '.join(MESH_AXES)} and "
                             f"N >= 1 (data=-1 = the devices left), e.g. --mesh data=2,tensor=2")
        sizes[axis] = int(size)
    return sizes


def settings_from_args(args, tokenizer):
    """GenerationSettings from the flags (sampling when --temperature > 0, --top-k or --top-p is given)."""
    from jaxctx.generate.settings import GenerationSettings

    sample = any(v is not None for v in (args.top_k, args.top_p)) or bool(args.temperature)
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    special = tokenizer.special
    eos = tuple(i for i in (special.eos,) if i is not None)
    pad = special.pad if special.pad is not None else (eos[0] if eos else 0)
    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=sample,
                              temperature=args.temperature or 1.0, top_k=args.top_k or 0,
                              top_p=1.0 if args.top_p is None else args.top_p,
                              repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                              length_penalty=args.length_penalty, eos_ids=eos, stop_ids=tuple(args.stop_id),
                              pad_id=pad, seed=args.seed)


def read_prompts(path: str) -> list[str]:
    """The "prompt" of every JSONL row; a row that is not an object with a string prompt names its line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UsageError(f"{path}:{number}: each row needs a string \"prompt\" field")
            prompts.append(row["prompt"])
    if not prompts:
        raise UsageError(f"{path}: no prompts (expected JSONL rows like {{\"prompt\": \"Once upon a time\"}})")
    return prompts


def check_out(path: str | None, force: bool) -> None:
    """Refuse an --out that exists (unless force) or whose directory does not, before any model work."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; give a file path like results.jsonl")
    if os.path.exists(path) and not force:
        raise UsageError(f"--out {path} exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path}: directory {parent} does not exist")


class _Stream:
    """Prints a completion as its tokens arrive (holding back a partial multi-byte character)."""

    def __init__(self, model, end_ids):
        self.model, self.end_ids, self.ids, self.printed, self.ended = model, set(end_ids), [], "", False

    def __call__(self, token: int) -> None:
        if self.ended:
            return
        self.ended = token in self.end_ids
        self.ids.append(token)
        text = self.model.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def generate_command(args) -> int:
    from jaxctx.generate import loading
    from jaxctx.generate.generator import Generator

    mesh_sizes = None if args.mesh is None else parse_mesh(args.mesh)  # refused before anything loads
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    check_out(args.out, args.force)
    model = loading.load(args.checkpoint, args.hf, tokenizer=args.tokenizer, step=args.step,
                         families=("gpt2", "llama"), command="generate")
    settings = settings_from_args(args, model.tokenizer)
    mesh = None
    if mesh_sizes is not None:
        from jaxctx.config import ParallelConfig
        from jaxctx.parallel import make_mesh

        mesh = make_mesh(ParallelConfig(**mesh_sizes))
    generator = Generator(model.cfg, model.params, truncate=args.truncate, mesh=mesh)
    ids = [model.encode(text) for text in prompts]
    for i, prompt in enumerate(ids):  # every bad prompt is refused before anything compiles
        generator.check_prompt(prompt, settings, f"prompt {i + 1}")
    stream = None
    if args.prompt is not None and args.out is None and settings.num_beams == 1:
        stream = _Stream(model, settings.end_ids)
    start = time.perf_counter()
    results = generator.generate(ids, settings, batch_size=args.batch_size, on_token=stream)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(r.token_ids) for r in results)
    rows = [{"prompt": text, "completion": model.decode(r.token_ids), "token_ids": list(r.token_ids),
             "finish_reason": r.finish_reason} for text, r in zip(prompts, results)]
    if stream is not None:
        sys.stdout.write(rows[0]["completion"][len(stream.printed):] + "\n")
    elif args.out is None and args.prompt is not None:  # beam search: nothing to stream
        print(rows[0]["completion"])
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if args.out is None:
            sys.stdout.write(text)
        else:
            from jaxctx.train.workdir import write_atomic

            write_atomic(args.out, text)
    reasons = ", ".join(f"{r}: {sum(x.finish_reason == r for x in results)}" for r in ("eos", "stop", "length"))
    print(f"[{len(results)} prompt(s), {new_tokens} new tokens in {seconds:.2f} s including compilation; "
          f"finish {reasons}]", file=sys.stderr)
    return 0
