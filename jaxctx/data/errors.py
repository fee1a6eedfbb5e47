"""Error types of the input pipeline.

Every error names the file, field or value that is wrong and what would be right. They are the data branch of
jaxctx.errors (so every entry point prints them as one line and exits 2) and subclass the builtin
`ValueError` / `FileNotFoundError`, so callers can catch the builtin type without importing this module.
"""

from __future__ import annotations

from jaxctx import errors


class DataError(errors.DataError):
    """Bad data or a bad data setting (empty dataset, missing field, bad format, ...)."""


class DataFileNotFoundError(errors.UserFileNotFoundError):
    """A data file, glob or directory matched nothing on disk."""


class EmptyDatasetError(DataError):
    """No documents (or no tokens) are left after loading, filtering, splitting or sharding."""


class MissingFieldError(DataError):
    """The configured `data.text_field` is not a column of the dataset."""


class TokenizerFilesError(errors.UserFileNotFoundError):
    """A tokenizer directory exists but holds no tokenizer files."""


class VocabSizeError(DataError):
    """The tokenizer emits ids that do not fit the model's embedding table (`model.vocab_size`)."""
