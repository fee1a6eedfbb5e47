"""Error types of the Hugging Face converter.

Every error names the file, tensor, key or shape that is wrong and what would be right. They are the conversion
branch of jaxctx.errors (so `jaxctx convert` prints them as one line and exits 2) and subclass the builtin
`ValueError` / `FileNotFoundError`, so callers can catch the builtin type without importing this module.
"""

from __future__ import annotations

from jaxctx import errors


class ConvertError(errors.ConvertError):
    """A model, config or directory cannot be converted (the message says which and why)."""


class HFFileNotFoundError(errors.UserFileNotFoundError):
    """A Hugging Face directory lacks config.json, weights, or a shard its index names."""


class PickleCheckpointError(ConvertError):
    """Only PyTorch pickle weights (.bin/.pt) are present; they are refused, never unpickled."""


class UnsupportedModelError(ConvertError):
    """config.json names a model_type, architecture or setting that jaxctx does not implement."""


class TensorMismatchError(ConvertError):
    """Missing, unexpected or wrongly shaped tensors (all of them are listed in the message)."""


class OutputExistsError(ConvertError):
    """OUT_DIR exists and is not empty (pass --force / force=True to replace it)."""


class TokenizerNotFoundError(errors.UserFileNotFoundError):
    """The tokenizer directory a checkpoint's config recorded is gone, or --tokenizer names no tokenizer."""
