"""Passkey retrieval (Mohtashami & Jaggi, 2023, arXiv:2305.16300): is the context really used?

A random 5-digit key is hidden at a relative depth of filler text of a given token length; the prompt ends with
a question, and the model's greedy continuation must start with the key. Accuracy per (length, depth) is the
heat map long-context papers show. Prompts are built in token space, so a prompt of "length 4096" is 4096
tokens (up to one filler sentence short) with whatever tokenizer the model has.

Keys are split in two halves by a hash (`is_eval_key`): these prompts draw only eval keys, and the synthetic
training documents of jaxctx.data.passkey_docs only the others, so a model trained on passkey documents is
measured on keys it has never seen (retrieval, not memorisation). A hash, not a digit rule, so the split carries
no pattern a model could learn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


KEY_RANGE = (10000, 100000)  # 5-digit keys: [low, high)


def is_eval_key(key: str) -> bool:
    """Whether `key` belongs to the evaluation half of the key space (a stable hash of its text, ~50%)."""
    return hashlib.blake2b(key.encode("ascii"), digest_size=8).digest()[0] < 128


def draw_key(rng: np.random.Generator, *, eval_half: bool, digits: int = 5) -> str:
    """A random key of `digits` digits (no leading zero) from one half of the key space (rejection sampling: ~2
    draws per key). The eval's keys have 5 digits; training documents may use longer ones."""
    while True:
        if digits == 5:
            key = str(rng.integers(*KEY_RANGE))
        else:
            key = str(rng.integers(1, 10)) + "".join(map(str, rng.integers(0, 10, digits - 1)))
        if is_eval_key(key) == eval_half:
            return key


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: np.ndarray  # int32 [n]
    key: str
    length: int  # the requested token length
    depth: float  # requested relative depth in [0, 1]
    needle_at: int  # token index where the needle starts


def build_prompt(encode: Callable[[str], np.ndarray], length: int, depth: float, key: str) -> PasskeyPrompt:
    """Filler up to `length` tokens with the needle at `depth` of the filler and the question at the end."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    filler, marker, question = encode(FILLER), encode(needle(key)), encode(QUESTION)
    room = length - len(marker) - len(question)
    if room < 0:
        raise ValueError(f"length={length} tokens cannot hold the passkey needle and question "
                         f"({len(marker) + len(question)} tokens)")
    repeats = room // len(filler)
    before = int(round(depth * repeats))
    ids = np.concatenate([np.tile(filler, before), marker, np.tile(filler, repeats - before), question])
    return PasskeyPrompt(ids.astype(np.int32), key, length, depth, before * len(filler))


def make_prompts(encode: Callable[[str], np.ndarray], lengths: Sequence[int], depths: Sequence[float],
                 trials: int, seed: int = 0) -> list[PasskeyPrompt]:
    """trials prompts per (length, depth), eval-half keys drawn from a seeded generator (reproducible)."""
    rng = np.random.default_rng(seed)
    return [build_prompt(encode, length, depth, draw_key(rng, eval_half=True))
            for length in lengths for depth in depths for _ in range(trials)]


def is_retrieved(completion: str, key: str) -> bool:
    """The continuation states the key first (leading spaces and punctuation aside)."""
    return completion.strip().lstrip(":").strip().startswith(key)


def accuracy_table(prompts: Sequence[PasskeyPrompt], completions: Sequence[str]) -> list[dict]:
    """[{"length", "depth", "trials", "correct", "accuracy"}] per (length, depth), in prompt order."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for prompt, completion in zip(prompts, completions, strict=True):
        cells.setdefault((prompt.length, prompt.depth), []).append(is_retrieved(completion, prompt.key))
    return [{"length": length, "depth": depth, "trials": len(hits), "correct": int(sum(hits)),
             "accuracy": sum(hits) / len(hits)} for (length, depth), hits in cells.items()]
