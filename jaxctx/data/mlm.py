"""BERT masked-language-model masking (Devlin et al. 2019, "BERT", section 3.1 and appendix A.1).

Each non-special, non-padding token is chosen independently with probability `data.mlm_probability` (0.15).
Of the chosen tokens 80% become [MASK], 10% a random non-special token, 10% stay unchanged; only chosen tokens
are scored (`loss_mask`), so labels are ignored everywhere else. Masking happens per batch from a numpy
Generator the pipeline seeds with (seed, process, batch number): the same batch is masked the same way after a
resume, and each epoch sees fresh masks (dynamic masking, as in RoBERTa).
"""

from __future__ import annotations

import numpy as np

from jaxctx.data.errors import DataError

MASK_FRACTION = 0.8  # of the chosen tokens, replaced by [MASK]
RANDOM_FRACTION = 0.1  # of the chosen tokens, replaced by a random token; the remaining 0.1 stay unchanged


def random_token_ids(vocab_size: int, special_ids: np.ndarray) -> np.ndarray:
    """The ids a 'random' replacement draws from: every id except the special tokens."""
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), special_ids)
    if ids.size == 0:
        raise DataError(f"the tokenizer's {vocab_size} ids are all special tokens; MLM needs ordinary tokens")
    return ids


def mask_tokens(batch: dict[str, np.ndarray], rng: np.random.Generator, *, probability: float, mask_id: int | None,
                special_ids: np.ndarray, random_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Apply MLM masking to a packed batch in place of its `input_ids`/`targets`/`loss_mask`; returns the batch.

    Expects the packed BERT batch (packing.assemble_rows with causal=False): `input_ids` [B, T] original tokens,
    `segment_ids` [B, T] with 0 at padding. Sets `targets` = original ids, `loss_mask` = 1.0 at chosen positions.
    """
    if mask_id is None:
        raise DataError("MLM masking needs a mask token, but the tokenizer has none (set data.tokenizer to a "
                        "tokenizer with a [MASK] token, or 'byte')")
    original = batch["input_ids"]  # [B, T]
    candidates = (batch["segment_ids"] > 0) & ~np.isin(original, special_ids)  # never padding or separators
    chosen = candidates & (rng.random(original.shape) < probability)
    action = rng.random(original.shape)  # one draw decides mask / random / keep
    to_mask = chosen & (action < MASK_FRACTION)
    to_random = chosen & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    replacement = random_ids[rng.integers(0, len(random_ids), original.shape)]
    inputs = np.where(to_mask, mask_id, original)
    inputs = np.where(to_random, replacement, inputs)
    batch["input_ids"] = inputs.astype(np.int32)
    batch["targets"] = original.astype(np.int32)
    batch["loss_mask"] = chosen.astype(np.float32)
    return batch
