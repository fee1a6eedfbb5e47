"""Training a byte-level BPE tokenizer with Hugging Face `tokenizers` (what `jaxctx tokenizer train` runs).

Byte-level BPE (GPT-2, Radford et al. 2019): text is mapped to bytes first, so every string is encodable and
decoding is lossless; merges are learned on top of the 256-byte alphabet. The special tokens are the byte
tokenizer's, in the same id order (`<pad>`=0 ... `<mask>`=6), so configs can switch tokenizers without changing
`model.pad_token_id`. The result is saved with `save_pretrained`, i.e. a directory `AutoTokenizer` loads.
"""

from __future__ import annotations

import os
from typing import Iterable

from jaxctx.data.errors import DataError
from jaxctx.data.tokenizer import SPECIAL_NAMES, SPECIAL_TOKENS

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials, before any merge


def train_bpe(texts: Iterable[str | list[str]], vocab_size: int, out_dir: str, *, min_frequency: int = 2):
    """Train byte-level BPE on `texts` (strings or batches of strings), save to `out_dir`, return the HF tokenizer.

    The vocabulary may end up smaller than `vocab_size` when the corpus has fewer frequent pairs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                        f"special tokens); use e.g. 512 or more")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no invented leading space: lossless
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                 **{f"{name}_token": token for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS)})
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf
