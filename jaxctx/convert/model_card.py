"""The generated model card (README.md) of an export: what the checkpoint's meta and its workdir recorded, nothing more.

Sources, all read-only: the checkpoint's meta (its config, step, and `source` for a from-hf import) and, when the
exported path is a training workdir, its `metrics.jsonl` (rows up to the exported step). The card states the
family and sizes, the steps trained, the data source and tokenizer, the last logged training loss and, when a
row records one (`val_perplexity` / `val_loss`), the validation result; where a value was not recorded it says so
instead of estimating it. The full jaxctx config follows as YAML, and a few lines on loading the directory.
"""

from __future__ import annotations

import json
import os

from jaxctx import config as config_lib
from jaxctx.config import Config

PIPELINE_TAG = {"gpt2": "text-generation", "llama": "text-generation", "bert": "fill-mask"}
AUTO_CLASS = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM"}
TASK_TAG = {"sequence_classification": ("text-classification", "AutoModelForSequenceClassification"),
            "token_classification": ("token-classification", "AutoModelForTokenClassification")}


def read_metrics(workdir: str, up_to_step: int | None) -> list[dict]:
    """The workdir's metrics.jsonl rows with step <= up_to_step (a torn last line is skipped, not an error)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a run killed mid-write leaves a partial line
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and (
                    up_to_step is None or row["step"] <= up_to_step):
                rows.append(row)
    return rows


def _last(rows: list[dict], key: str) -> dict | None:
    return next((row for row in reversed(rows) if isinstance(row.get(key), (int, float))), None)


def model_card(cfg: Config, *, name: str, step: int | None, source: str, meta: dict, metrics: list[dict],
               tokenizer: str | None, params: int) -> str:
    """README.md text (titled `name`) for an export of `cfg` at `step` from `source` (a workdir or checkpoint)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    origin = meta.get("source") if isinstance(meta.get("source"), dict) else None
    imported = origin is not None and origin.get("format") == "huggingface"
    tag, auto = TASK_TAG.get(m.task, (PIPELINE_TAG[m.family], AUTO_CLASS[m.family]))
    lines = ["---", "library_name: transformers", f"pipeline_tag: {tag}", "tags:", "- jaxctx", "---", "",
             f"# {name}", "",
             f"A {m.family} model ({params / 1e6:.2f}M parameters: {m.num_layers} layers, d_model {m.d_model}, "
             f"{m.num_heads} heads, vocabulary {m.vocab_size}, context {m.positions} tokens), exported by "
             f"`jaxctx convert to-hf` from `{source}`.", "", "## Training", ""]
    if imported:
        lines.append(f"- Not trained by jaxctx: converted from the Hugging Face directory `{origin.get('path')}` "
                     f"(model_type {origin.get('model_type')}) by `jaxctx convert from-hf`.")
    else:
        lines.append(f"- Steps: {step} (the config asked for train.steps={t.steps}), batch {t.batch_size} "
                     f"sequences of {d.seq_len} tokens, {t.optimizer}, peak learning rate {t.learning_rate:g}.")
        if t.init_from:
            lines.append(f"- Initialised from `{t.init_from}`.")
        lines.append(f"- Data: data.source={d.source}" + (f" (max_documents={d.max_documents})"
                                                            if d.max_documents else "")
                     + f", validation_fraction={d.validation_fraction:g}.")
        loss = _last(metrics, "loss")
        lines.append(f"- Last logged training loss: {loss['loss']:.4f} at step {loss['step']} (metrics.jsonl)."
                     if loss else "- Training loss: not recorded (no metrics.jsonl rows with the exported source).")
        val = _last(metrics, "val_perplexity") or _last(metrics, "val_loss")
        if val is not None:
            parts = [f"{key} {val[key]:.4f}" for key in ("val_loss", "val_perplexity") if key in val]
            lines.append(f"- Validation: {', '.join(parts)} at step {val['step']} (metrics.jsonl).")
        else:
            lines.append("- Validation perplexity: not recorded in the workdir.")
    lines.append(f"- Tokenizer: {_describe_tokenizer(tokenizer)}.")
    lines += ["", "## Use with transformers", "", "```python", "from transformers import pipeline", "",
              f'pipe = pipeline("{tag}", model="path/to/this/directory")',
              ('print(pipe("def main():", max_new_tokens=20, do_sample=False)[0]["generated_text"])'
               if tag == "text-generation" else 'print(pipe(f"import {pipe.tokenizer.mask_token}"))'
               if tag == "fill-mask" else 'print(pipe("def main():"))'),
              "```", "", f"or `transformers.{auto}.from_pretrained` with `AutoTokenizer`.", "",
              "## jaxctx config", "", "```yaml", config_lib.to_yaml(cfg).rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _describe_tokenizer(tokenizer: str | None) -> str:
    if tokenizer is None:
        return "none found with the checkpoint (add the model's tokenizer files to this directory)"
    if tokenizer == "byte":
        return ("the jaxctx byte tokenizer (ids 0-6 `<pad> <bos> <eos> <unk> <cls> <sep> <mask>`, byte b = id b + 7), "
                "written as a byte-level `tokenizer.json`")
    return f"copied from `{tokenizer}`"
