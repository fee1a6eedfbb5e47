"""Tokenizers: the built-in byte-level tokenizer and any local Hugging Face tokenizer directory.

Both expose the same small surface the pipeline needs (`Tokenizer`): `vocab_size`, the special-token ids,
`encode_batch(texts)` and `decode(ids)`. The byte tokenizer needs no files, so `python train.py` works offline:

    id 0..6   <pad> <bos> <eos> <unk> <cls> <sep> <mask>     (same order as `jaxctx tokenizer train` writes)
    id 7..262 the 256 byte values (byte b -> b + 7)

Specials come first so that `<pad>` is id 0, matching `model.pad_token_id=0`; 263 ids fit the default
`model.vocab_size=512`. `check_vocab` is the guard the trainer calls before building the embedding table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from jaxctx import storage
from jaxctx.data.errors import DataError, DataFileNotFoundError, TokenizerFilesError, VocabSizeError

# Names of the special tokens, in id order for the byte tokenizer and the BPE trainer.
SPECIAL_NAMES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")
SPECIAL_TOKENS = tuple(f"<{name}>" for name in SPECIAL_NAMES)

# Any of these files makes a directory loadable by AutoTokenizer (fast json, WordPiece, BPE pair, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens; None where the tokenizer has no such token."""

    pad: int | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None

    def separator(self, causal: bool) -> int:
        """The token that ends each packed document: EOS for causal LMs, SEP for BERT (falling back to the other)."""
        order = (self.eos, self.sep) if causal else (self.sep, self.eos)
        for token in order:
            if token is not None:
                return token
        raise DataError("the tokenizer has neither an EOS nor a SEP token; packing needs one to separate documents")

    def padding(self, causal: bool) -> int:
        """The id written at padding positions (never attended or scored: padding has its own segment id)."""
        return self.pad if self.pad is not None else self.separator(causal)


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    name: str  # "byte" or the directory it was loaded from
    vocab_size: int  # number of ids, including added special tokens
    special: SpecialTokens
    special_ids: np.ndarray  # int32 [S]: every special id (never chosen or drawn by MLM masking)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes -> ids, with the special tokens in front. Lossless; no files; ~1 GB/s in numpy."""

    offset = len(SPECIAL_NAMES)  # byte b has id b + offset

    def __init__(self):
        self.name = "byte"
        self.version = 1  # part of the datasets cache fingerprint: bump when the id mapping changes
        self.vocab_size = 256 + self.offset
        self.special = SpecialTokens(**{name: i for i, name in enumerate(SPECIAL_NAMES)})
        self.special_ids = np.arange(self.offset, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # uint8 -> int32 before adding the offset: 255 + 7 would wrap around in uint8.
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + self.offset for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        # Specials carry no bytes; ids past the 256 bytes (unused rows of a larger embedding, which an untrained
        # model can emit) carry none either -- uint8 would wrap them onto real bytes.
        text_ids = ids[(ids >= self.offset) & (ids < self.offset + 256)] - self.offset
        return bytes(text_ids.astype(np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=263)"


class HFTokenizer:
    """A Hugging Face tokenizer loaded with `AutoTokenizer.from_pretrained(local_dir)`."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer  # deferred: transformers is slow to import

        self.name = directory
        self.hf = AutoTokenizer.from_pretrained(directory)
        self.vocab_size = len(self.hf)  # len() counts added tokens; .vocab_size does not
        self.special = SpecialTokens(**{name: getattr(self.hf, f"{name}_token_id", None) for name in SPECIAL_NAMES})
        self.special_ids = np.asarray(sorted(set(self.hf.all_special_ids)), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # No special tokens: packing adds the separator itself. verbose=False silences the "longer than
        # model_max_length" warning, which is meaningless here because documents are split by packing.
        out = self.hf(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
        return [np.asarray(ids, dtype=np.int32) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(map(int, ids)))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _local_copy(url: str) -> str:
    """A gs:// tokenizer directory's tokenizer files, downloaded into a temporary directory (kept for the process:
    transformers reads them lazily)."""
    import tempfile

    if not storage.isdir(url):
        raise DataFileNotFoundError(f"data.tokenizer={url!r} does not exist (no objects under that prefix)")
    found = storage.listdir(url)
    if not any(n in TOKENIZER_FILES for n in found):
        raise TokenizerFilesError(f"tokenizer directory {url} holds no tokenizer files (expected one of "
                                  f"{', '.join(TOKENIZER_FILES)}); it has: {', '.join(found[:20]) or 'nothing'}")
    local = tempfile.mkdtemp(prefix="jaxctx-tokenizer-")
    side = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt")
    storage.copy_files(url, local, [n for n in found if n in TOKENIZER_FILES + side])
    return local


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` -> the built-in byte tokenizer; a local directory -> `AutoTokenizer.from_pretrained(dir)`.

    Raises DataFileNotFoundError if the directory does not exist, TokenizerFilesError if it holds no tokenizer
    files. Hub names are not fetched: download once with `huggingface-cli download NAME --local-dir DIR`.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = _local_copy(spec) if storage.is_url(spec) else os.path.expanduser(spec)
    if not os.path.isdir(path):
        raise DataFileNotFoundError(
            f"data.tokenizer={spec!r} is neither 'byte' nor an existing directory; pass a local Hugging Face "
            f"tokenizer directory (e.g. one written by `jaxctx tokenizer train --out DIR`)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise TokenizerFilesError(
            f"tokenizer directory {path} holds no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            f"it has: {', '.join(sorted(os.listdir(path))) or 'nothing'}")
    try:
        return HFTokenizer(path)
    except Exception as err:  # transformers raises KeyError/ValueError/OSError/... for broken tokenizer files
        detail = " ".join(str(err).split())[:200]
        raise TokenizerFilesError(
            f"tokenizer directory {path} cannot be loaded by transformers' AutoTokenizer "
            f"({type(err).__name__}: {detail}); re-create it (e.g. `jaxctx tokenizer train --out DIR`) or set "
            f"data.tokenizer=byte") from None


def check_vocab(tokenizer: Tokenizer | int, model_vocab_size: int) -> None:
    """Raise VocabSizeError if the tokenizer's ids do not fit an embedding table of `model_vocab_size` rows.

    The trainer calls this before building the model; `jaxctx data inspect` calls it too. A model table larger
    than the vocabulary is fine (the byte tokenizer's 263 ids in the default 512 rows).
    """
    vocab = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    name = "" if isinstance(tokenizer, int) else f" of tokenizer {tokenizer.name!r}"
    if vocab > model_vocab_size:
        suggested = -(-vocab // 128) * 128  # round up to a multiple of 128: friendlier matmul shapes
        raise VocabSizeError(
            f"the vocabulary{name} has {vocab} ids but model.vocab_size={model_vocab_size}; "
            f"set model.vocab_size>={vocab} (e.g. {suggested}) or use a smaller tokenizer")
