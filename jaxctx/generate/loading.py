"""A model for inference: (config, params, tokenizer) from a jaxctx checkpoint / workdir or a Hugging Face directory.

Shared by `jaxctx generate`, `fill-mask` and `eval`. The tokenizer is the one the checkpoint's config names
(`data.tokenizer`: "byte" or a directory; a from-hf checkpoint points at its own hf_files/), the HF directory's
own tokenizer files, or an explicit override.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from jaxctx.config import Config
from jaxctx.errors import UsageError


@dataclass
class InferenceModel:
    """What an inference command needs: the resolved config, params (host arrays) and the tokenizer."""

    cfg: Config
    params: Any
    tokenizer: Any
    source: str  # the checkpoint or HF directory, for messages and output rows
    step: int | None = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a prompt, as transformers' pipelines encode it (with the tokenizer's own special tokens,
        e.g. LLaMA's BOS; the byte tokenizer adds none)."""
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return np.asarray(hf(text, add_special_tokens=True)["input_ids"], np.int32)
        return self.tokenizer.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids without special tokens (EOS, padding)."""
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return hf.decode(list(map(int, ids)), skip_special_tokens=True)
        return self.tokenizer.decode(ids)


def check_family(family: str, families: tuple[str, ...], command: str, where: str) -> None:
    if family not in families:
        raise UsageError(f"{where} holds a {family} model; {command} needs {' or '.join(families)}")


def check_task(task: str, tasks: tuple[str, ...], command: str, where: str) -> None:
    if task not in tasks:
        raise UsageError(f"{where} holds a model.task={task} model; {command} needs model.task "
                         f"{' or '.join(tasks)}")


def load(checkpoint: str | None = None, hf: str | None = None, *, tokenizer: str | None = None,
         step: int | None = None, families: tuple[str, ...] = ("gpt2", "llama", "bert"),
         command: str = "this command", tasks: tuple[str, ...] = ("lm",)) -> InferenceModel:
    """Exactly one of checkpoint (a workdir or checkpoint root; latest step unless `step`) and hf (a directory
    written by save_pretrained). tokenizer overrides the tokenizer ("byte" or a directory). A model outside
    `families` or `tasks` (model.task: language models by default) is refused (naming `command`) before any
    weights are read (--checkpoint) or used (--hf)."""
    from jaxctx import config as config_lib
    from jaxctx.data.tokenizer import load_tokenizer

    if (checkpoint is None) == (hf is None):
        raise UsageError("give exactly one of --checkpoint DIR and --hf HF_DIR")
    if checkpoint is not None:
        from jaxctx.checkpoint import load_params, params_metadata

        _, _, meta = params_metadata(checkpoint, step=step)
        if "config" not in meta:
            raise UsageError(f"--checkpoint {checkpoint}: the checkpoint meta has no config; cannot tell which model "
                             f"it holds")
        cfg = config_lib.from_dict(meta["config"]).resolved()
        check_family(cfg.model.family, families, command, f"--checkpoint {checkpoint}")
        check_task(cfg.model.task, tasks, command, f"--checkpoint {checkpoint}")
        params, meta = load_params(checkpoint, step=step)
        spec, source, at = tokenizer or cfg.data.tokenizer, os.path.abspath(checkpoint), meta.get("step")
    else:
        from jaxctx.convert import io
        from jaxctx.convert.api import from_hf

        model_type = io.read_hf_config(hf).get("model_type")
        check_family(str(model_type), families, command, f"--hf {hf}")
        cfg, params = from_hf(hf)
        check_task(cfg.model.task, tasks, command, f"--hf {hf}")
        source, at = os.path.abspath(hf), None
        spec = tokenizer
        if spec is None:
            if not io.has_tokenizer_files(hf):
                raise UsageError(f"--hf {hf} holds no tokenizer files (tokenizer.json, vocab.json, ...); pass "
                                 f"--tokenizer DIR (or byte)")
            spec = hf
    tok = load_tokenizer(spec)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's vocabulary has "
                         f"{cfg.model.vocab_size}: they do not belong together (pass the right --tokenizer)")
    return InferenceModel(cfg, params, tok, source, at)
