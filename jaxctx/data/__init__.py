"""Input pipeline: Hugging Face `datasets` sources -> tokenizers -> packing with segment ids -> [MLM] -> batches.

Public API (what the training loop calls):

    build_iterator(cfg, split="train", *, process_index=None, process_count=None, repeat=True, state=None)
        -> DataIterator: `next(it)` -> {name: np.ndarray [B_local, T]}, `it.get_state()`, `it.set_state(s)`,
           `it.seek(step)`, `it.stats()`
    make_global_batch(local_batch, sharding) -> {name: jax.Array [B, T]}
    load_tokenizer(spec) -> Tokenizer;  check_vocab(tokenizer, model_vocab_size)

Batch keys and dtypes are documented in jaxctx/data/packing.py; the stages in docs/data.md. Names are imported
lazily so that `jaxctx --help` (which imports jaxctx.data.cli) does not pay for `datasets` and `jax`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_iterator": "jaxctx.data.pipeline",
    "DataIterator": "jaxctx.data.pipeline",
    "local_batch_size": "jaxctx.data.global_batch",
    "make_global_batch": "jaxctx.data.global_batch",
    "load_tokenizer": "jaxctx.data.tokenizer",
    "check_vocab": "jaxctx.data.tokenizer",
    "ByteTokenizer": "jaxctx.data.tokenizer",
    "load_documents": "jaxctx.data.sources",
    "train_bpe": "jaxctx.data.bpe",
    "DataError": "jaxctx.data.errors",
    "DataFileNotFoundError": "jaxctx.data.errors",
    "EmptyDatasetError": "jaxctx.data.errors",
    "MissingFieldError": "jaxctx.data.errors",
    "TokenizerFilesError": "jaxctx.data.errors",
    "VocabSizeError": "jaxctx.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxctx.data' has no attribute {name!r}")
