"""Synthetic passkey documents mixed into the token stream (`data.passkey_fraction`).

Each document is a passkey prompt of jaxctx.evaluate.passkey (filler, the needle at a random relative depth, the
question) followed by its answer, ` KEY.`:

    The grass is green. ... The pass key is 12345. Remember it. 12345 is the pass key. ... The pass key is 12345.
    |<-------------------- build_prompt(length - answer, depth, key) -------------------->|<-- answer -->|

Keys have 5 digits, or 5 to `data.passkey_max_digits` (uniform): keys of different lengths put the needle's two
copies of a key digit at different distances, so a model cannot learn the second copy (and then the answer) as
"the token a fixed offset back"; it has to match content, which is what retrieval at any depth needs, and a longer
key gives more such tokens per document. Lengths are uniform in [max(shortest prompt, data.passkey_min_length),
data.seq_len - 1] tokens (the separator makes the document fit a row; `data.align_documents` keeps it in one),
depths uniform in [0, 1]. With uniform lengths a key-to-question distance d has density ∝ ln(max_length / max(d,
min_length)), so distances near the whole row are rare (at 4096 tokens, 3900 back is 29x rarer than under 1000);
`data.passkey_full_length_fraction` makes that share of documents exactly `data.seq_len - 1` tokens long, whose
distances are uniform over the whole row, and keeps the shorter ones for the short prompts. Keys come from the
training half of the key space (`passkey.is_eval_key` is False), so `jaxctx eval passkey`, which draws only
eval-half keys, never asks for a key the model was trained on.

Mixing is by tokens: documents are generated until they hold `fraction / (1 - fraction)` times the source's
tokens, so `fraction` of the packed stream is passkey text; they are shuffled into the epoch order with the source
documents. Everything is drawn from a numpy Generator seeded by (train.seed, split, process), so the same
settings give the same documents and a resumed run continues the same stream.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxctx.data.errors import DataError
from jaxctx.evaluate.passkey import FILLER, QUESTION, build_prompt, draw_key, needle

_STREAM_TAG = 0x504B4559  # "PKEY": keeps this Generator apart from the pipeline's order permutations
_SPLIT_IDS = {"train": 0, "validation": 1}


def answer(key: str) -> str:
    """The text after the question that states the key (what `passkey.is_retrieved` accepts)."""
    return f" {key}."


def shortest_document(encode: Callable[[str], np.ndarray], max_digits: int = 5) -> int:
    """Tokens in the shortest passkey document with a key of up to `max_digits` digits: one filler sentence,
    needle, question and answer (plus a margin of 5 tokens, as a subword tokenizer may split one key into more
    tokens than another)."""
    key = "0" * max_digits
    return sum(len(encode(text)) for text in (FILLER, needle(key), QUESTION, answer(key))) + 5


def passkey_documents(encode: Callable[[str], np.ndarray], *, max_length: int, num_tokens: int, seed: int,
                      split: str = "train", process_index: int = 0, max_digits: int = 5,
                      min_length: int = 0, full_length_fraction: float = 0.0) -> list[np.ndarray]:
    """Passkey documents (int32 token ids) of max(`shortest_document`, `min_length`) to `max_length` tokens (a
    `full_length_fraction` share of them exactly `max_length`), until they hold at least `num_tokens` tokens, with
    keys of 5 to `max_digits` digits. Deterministic in (seed, split, process_index)."""
    shortest = shortest_document(encode, max_digits)
    if max_length < shortest:
        raise DataError(f"data.passkey_fraction: a passkey document needs at least {shortest} tokens but "
                        f"data.seq_len={max_length + 1} leaves {max_length}; raise data.seq_len")
    if min_length > max_length:
        raise DataError(f"data.passkey_min_length={min_length} is longer than the {max_length} tokens "
                        f"data.seq_len={max_length + 1} leaves for a document; lower it or raise data.seq_len")
    min_length = max(min_length, shortest)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], process_index, _STREAM_TAG])
    docs, total = [], 0
    while total < num_tokens:
        length = int(rng.integers(min_length, max_length + 1))
        if full_length_fraction and rng.random() < full_length_fraction:  # 0: no draw, the stream of old runs
            length = max_length
        depth = float(rng.random())
        digits = 5 if max_digits == 5 else int(rng.integers(5, max_digits + 1))  # 5: the stream of old runs
        key = draw_key(rng, eval_half=False, digits=digits)
        tail = encode(answer(key))
        prompt = build_prompt(encode, length - len(tail), depth, key)
        docs.append(np.concatenate([prompt.ids, tail]).astype(np.int32))
        total += len(docs[-1])
    return docs


def passkey_token_budget(fraction: float, source_tokens: int) -> int:
    """Passkey tokens that make `fraction` of a stream whose other tokens number `source_tokens`."""
    return int(round(fraction / (1.0 - fraction) * source_tokens))
