"""Decoding settings, with the semantics and defaults of transformers' GenerationConfig where both have the knob."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from jaxctx.errors import UsageError


class Knobs(NamedTuple):
    """The traced values of GenerationSettings (see `GenerationSettings.knobs`); eos / stop ids [E], [S]."""

    temperature: Any
    top_k: Any
    top_p: Any
    repetition_penalty: Any
    seed: Any
    pad_id: Any
    eos_ids: Any
    stop_ids: Any


class GenerateError(UsageError):
    """A decoding setting or prompt that cannot be used (the message names the setting and its value)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to pick each new token. Frozen and hashable: it is a static argument of the jitted decode loop.

    Greedy by default (as transformers). do_sample draws from softmax(logits / temperature) after the top_k and
    top_p filters; num_beams > 1 is beam search (transformers' vectorised algorithm: 2·num_beams candidates per
    step, length_penalty dividing the summed log-probabilities by generated_length ** length_penalty,
    early_stopping True | False | "never"). repetition_penalty (CTRL, Keskar et al. 2019) divides the positive
    logits and multiplies the negative ones of every token already in the row (prompt or generated). A row
    stops at max_new_tokens, at one of eos_ids (finish_reason "eos") or of stop_ids ("stop"); the stop token is
    kept in the output, and later slots hold pad_id.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature!r} must be > 0 (use do_sample=False for greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 = off)")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams!r} must be an integer >= 1")
        if self.early_stopping not in (True, False, "never"):
            problems.append(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if self.num_beams > 1 and self.do_sample:
            problems.append("beam search with sampling (num_beams > 1 and do_sample) is not supported")
        if problems:
            raise GenerateError("; ".join(problems))
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    def compile_key(self) -> "GenerationSettings":
        """The settings with every value that `knobs` carries normalised: equal keys share a compiled loop.

        What stays is what changes the program: strategy, lengths, early stopping, the length penalty (an
        exponent in a static branch), how many end ids there are, and which filters are on at all.
        """
        return dataclasses.replace(
            self, temperature=1.0, seed=0, pad_id=0, top_k=int(self.top_k > 0), top_p=1.0 if self.top_p >= 1 else 0.5,
            repetition_penalty=1.0 if self.repetition_penalty == 1 else 2.0,
            eos_ids=(-1,) * len(self.eos_ids), stop_ids=(-2,) * len(self.end_ids[len(self.eos_ids):]))

    def knobs(self) -> "Knobs":
        """The numeric settings as arrays: traced inputs of the compiled loop, so changing them recompiles nothing."""
        import numpy as np

        extra_stops = self.end_ids[len(self.eos_ids):]
        return Knobs(np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p),
                     np.float32(self.repetition_penalty), np.int32(self.seed), np.int32(self.pad_id),
                     np.asarray(self.eos_ids, np.int32).reshape(-1), np.asarray(extra_stops, np.int32).reshape(-1))

    def replace(self, **changes) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every id that ends a row (EOS first)."""
        return self.eos_ids + tuple(i for i in self.stop_ids if i not in self.eos_ids)
