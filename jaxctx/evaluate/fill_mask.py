"""Fill-mask for BERT checkpoints: the top-k tokens and probabilities at every mask, as transformers' pipeline.

For a Hugging Face tokenizer the text is encoded exactly as `pipeline("fill-mask")` does (with [CLS]/[SEP]), so
the scores are comparable one to one; with the byte tokenizer, each "[MASK]" (or "<mask>") in the text becomes
the mask id between the bytes of the pieces around it.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from jaxctx.errors import UsageError

BYTE_MASKS = re.compile(r"\[MASK\]|<mask>")


def encode_masked(model, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T] int32, mask positions [M]) of a text holding the tokenizer's mask token at least once."""
    tok = model.tokenizer
    mask_id = tok.special.mask
    if mask_id is None:
        raise UsageError(f"tokenizer {tok.name!r} has no mask token; fill-mask needs a masked-LM tokenizer")
    hf = getattr(tok, "hf", None)
    if hf is not None:
        ids = np.asarray(hf(text, add_special_tokens=True)["input_ids"], np.int32)
        mask_text = hf.mask_token
    else:
        pieces = BYTE_MASKS.split(text)
        parts = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append(np.asarray([mask_id], np.int32))
            parts.append(tok.encode_batch([piece])[0])
        ids = np.concatenate(parts).astype(np.int32)
        mask_text = "[MASK]"
    positions = np.flatnonzero(ids == mask_id)
    if positions.size == 0:
        raise UsageError(f"--text has no mask token; write {mask_text} where the model should fill in")
    return ids, positions


def fill_mask(model, text: str, top_k: int = 5) -> list[list[dict]]:
    """Per mask (in text order): top_k dicts {"score", "token", "token_str", "sequence"}, best first.

    "sequence" is the text with that one mask filled (the others left as masks), decoded without specials.
    """
    from jaxctx.models import build

    if model.cfg.model.family != "bert":
        raise UsageError(f"{model.source} holds a {model.cfg.model.family} model; fill-mask needs bert")
    if top_k < 1:
        raise UsageError(f"--top-k {top_k} must be >= 1")
    ids, positions = encode_masked(model, text)
    if ids.size > model.cfg.model.positions:
        raise UsageError(f"--text has {ids.size} tokens, more than model.max_positions={model.cfg.model.positions}")
    logits = build(model.cfg).apply({"params": model.params}, ids[None])[0]  # [T, V] f32
    probs = np.asarray(jax.nn.softmax(logits[positions], axis=-1))  # [M, V]
    vocab = min(probs.shape[-1], model.tokenizer.vocab_size)  # rows past the tokenizer's ids are padding
    results = []
    for row, position in zip(probs[:, :vocab], positions):
        best = np.argsort(-row, kind="stable")[:top_k]
        candidates = []
        for token in best:
            filled = ids.copy()
            filled[position] = token
            candidates.append({"score": float(row[token]), "token": int(token),
                               "token_str": model.tokenizer.decode([int(token)]),
                               "sequence": model.decode(filled)})
        results.append(candidates)
    return results
