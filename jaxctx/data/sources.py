"""Document sources: files, globs, directories, hub datasets and the embedded Python-stdlib corpus.

`load_documents(data_cfg, split, process_index, process_count)` returns this process's share of one split as a
Hugging Face dataset with a single string column `text`, one row per document. Loading is done by
`datasets.load_dataset` ("text" | "json" | "parquet" builders, or a hub name), which caches Arrow files under
`data.cache_dir`; this module only decides *which* files, checks them, and filters:

    resolve files ──> scan UTF-8 ──> load_dataset ──> text column ──> drop empty ──> train/validation split
                  ──> max_documents ──> split_dataset_by_node (this process's contiguous share)

Train/validation split: a document is held out iff a 64-bit hash of its key falls below
`data.validation_fraction`. The key is the file path relative to the stdlib root for the stdlib corpus and the
document text otherwise, so the split is deterministic, independent of file order and never overlaps
(identical documents land on the same side).

Sources: `data.source="stdlib"` (default) is every `.py` file under `sysconfig.get_paths()["stdlib"]` except
site-packages and the test suites (which hold deliberately mis-encoded files), one document per file: ~730 files,
~12 MB on CPython 3.11. Hub datasets need the explicit prefix `hub:NAME` (and network), so a mistyped local path
is reported as missing rather than sent to the hub.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import sysconfig
import warnings
from dataclasses import dataclass, field
from typing import Any

from jaxctx.data.errors import DataError, DataFileNotFoundError, EmptyDatasetError, MissingFieldError

STDLIB = "stdlib"
HUB_PREFIX = "hub:"
SPLITS = ("train", "validation")
# Directories under the stdlib root that are not the library itself.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_SURROGATES = re.compile("[\udc80-\udcff]")
_FORMAT_BY_EXT = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Documents:
    """One split of one source, for one process."""

    dataset: Any  # datasets.Dataset | datasets.IterableDataset with one string column "text"
    description: str  # human-readable source name for messages ("stdlib", "data/*.jsonl", "hub:wikitext")
    files: list[str] = field(default_factory=list)  # local files loaded (after UTF-8 cleaning)
    invalid_utf8_bytes: int = 0  # bytes that were not valid UTF-8 and were replaced by U+FFFD


# ----------------------------------------------------------------------------------------------------------
# Which files
# ----------------------------------------------------------------------------------------------------------

def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted absolute paths of the standard library's own .py files)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)  # prune in place: os.walk obeys
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not files:
        raise DataFileNotFoundError(f"no .py files under the stdlib directory {root} (sysconfig 'stdlib' path)")
    return root, sorted(files)


def resolve_files(spec: str) -> list[str]:
    """A file, a glob (`**` allowed) or a directory (every non-hidden file below it) -> sorted file paths."""
    path = os.path.expanduser(spec)
    if glob.has_magic(path):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        if not files:
            raise DataFileNotFoundError(f"no files match data.source={spec!r}")
    elif os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        if not files:
            raise DataFileNotFoundError(f"data.source directory {path} holds no files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataFileNotFoundError(f"data file {path} does not exist (data.source={spec!r}; "
                                    f"use 'stdlib', a file, a glob, a directory or 'hub:NAME')")
    return sorted(files)


def guess_format(files: list[str], fmt: str | None) -> str:
    """The builder for `files`: `fmt` if set, else from the extensions (json, parquet; anything else is text)."""
    if fmt is not None:
        return fmt
    found = {}
    for f in files:
        base = f[: -len(ext)] if (ext := next((e for e in _COMPRESSED if f.endswith(e)), "")) else f
        found.setdefault(_FORMAT_BY_EXT.get(os.path.splitext(base)[1].lower(), "text"), f)
    if len(found) > 1:
        examples = ", ".join(f"{name} ({path})" for name, path in found.items())
        raise DataError(f"data.source mixes file formats: {examples}; select one kind of file or set data.format")
    return next(iter(found))


def hash_fraction(key: str) -> float:
    """A stable hash of `key` mapped to [0, 1): independent of Python's per-process hash seed."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def in_split(key: str, split: str, validation_fraction: float) -> bool:
    """Whether the document (or file) with this key belongs to `split`."""
    held_out = hash_fraction(key) < validation_fraction
    return held_out if split == "validation" else not held_out


# ----------------------------------------------------------------------------------------------------------
# UTF-8: count and replace bad bytes before the builders see them
# ----------------------------------------------------------------------------------------------------------

def _count_invalid_utf8(data: bytes) -> tuple[int, str | None]:
    """(number of invalid bytes, the decoded text with U+FFFD replacements or None if the bytes were valid)."""
    try:
        data.decode("utf-8")
        return 0, None
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each invalid byte to one lone surrogate U+DC80..U+DCFF, which makes them countable
    # ("replace" alone would not say how many bytes were bad).
    text = data.decode("utf-8", errors="surrogateescape")
    text, bad = _SURROGATES.subn("\ufffd", text)
    return bad, text


def clean_utf8(files: list[str], clean_dir: str) -> tuple[list[str], int]:
    """Replace invalid UTF-8 in text/json files by U+FFFD, warn naming each file, return (files to load, count).

    Clean copies go under `clean_dir` (keyed by path, size and mtime) so the `datasets` builders, which would
    raise on invalid bytes, read valid UTF-8; valid files are loaded in place. Compressed files are not scanned.
    """
    out, total, report = [], 0, []
    for path in files:
        if path.endswith(_COMPRESSED):
            out.append(path)
            continue
        with open(path, "rb") as f:
            bad, text = _count_invalid_utf8(f.read())
        if not bad:
            out.append(path)
            continue
        stat = os.stat(path)
        key = hashlib.blake2b(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode(),
                              digest_size=8).hexdigest()
        target = os.path.join(clean_dir, key, os.path.basename(path))  # keep the name: formats go by extension
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target + ".tmp", "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.replace(target + ".tmp", target)  # atomic: concurrent processes never read half a file
        out.append(target)
        total += bad
        report.append(f"{path} ({bad} bytes)")
    if total:
        warnings.warn(f"replaced {total} invalid UTF-8 bytes with U+FFFD in {len(report)} file(s): "
                      + ", ".join(report[:10]) + (" ..." if len(report) > 10 else ""), UnicodeWarning, stacklevel=2)
    return out, total


# ----------------------------------------------------------------------------------------------------------
# Filters (module-level so `datasets` can fingerprint and cache them, and pickle them for num_proc)
# ----------------------------------------------------------------------------------------------------------

def _nonempty(batch: dict) -> list[bool]:
    return [bool(t) and not t.isspace() for t in batch["text"]]


def _split_filter(batch: dict, split: str, validation_fraction: float) -> list[bool]:
    return [in_split(t, split, validation_fraction) for t in batch["text"]]


def _workers(rows: int, num_proc: int) -> int | None:
    """Processes for a datasets.map/filter over `rows` rows: forking costs ~0.3 s, so small sets use one.

    `datasets` forks its workers. Forking a process whose JAX backend already runs its thread pools can deadlock
    the child, so once a backend is up we tokenize in-process (the training loop builds its data first).
    """
    if _jax_backend_running():
        return None
    return num_proc if num_proc > 1 and rows >= 100 * num_proc else None


def _jax_backend_running() -> bool:
    import sys
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst, stay single-process
        return True


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _cache_root(cache_dir: str | None) -> str:
    import datasets

    return os.path.expanduser(cache_dir) if cache_dir else datasets.config.HF_DATASETS_CACHE


@contextlib.contextmanager
def _quiet_datasets_errors():
    """Silence the `datasets` logger while loading: its loaders log each parse failure (with a traceback)
    before raising, and we report that failure ourselves as one DataError line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(builder: str, cfg, description: str, **kwargs):
    import datasets

    try:
        with _quiet_datasets_errors():
            return datasets.load_dataset(builder, split="train", streaming=cfg.streaming, cache_dir=cfg.cache_dir,
                                         **kwargs)
    except (FileNotFoundError, DataError):
        raise
    except Exception as err:  # datasets wraps parse errors in its own types; name the source instead
        raise DataError(f"could not load {description} with the {builder!r} loader: {_root_cause(err)}") from err


def _root_cause(err: BaseException) -> str:
    """'Type: message' of the innermost cause (the JSON or Arrow parse error datasets wraps), on one line."""
    seen = 0
    while (err.__cause__ or err.__context__) is not None and seen < 8:
        err, seen = err.__cause__ or err.__context__, seen + 1
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _column_names(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # a streaming json dataset learns its columns from the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    return list(names)


def _select_text(ds, text_field: str, description: str):
    """Keep only `text_field`, renamed to "text"; check it exists and holds strings."""
    names = _column_names(ds)
    if text_field not in names:
        raise MissingFieldError(f"text field {text_field!r} is not a column of {description}; "
                                f"columns are: {', '.join(names) or 'none'} (set data.text_field)")
    ds = ds.select_columns([text_field])
    features = getattr(ds, "features", None)
    if features is not None and text_field in features:
        dtype = getattr(features[text_field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DataError(f"text field {text_field!r} of {description} holds {features[text_field]}, "
                            f"not strings; set data.text_field to a string column")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


def _check_nonempty(ds, what: str) -> None:
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        # Not ds.take(1): on a split_dataset_by_node stream, take() applies before the per-node step.
        empty = next(iter(ds), None) is None
    else:
        empty = len(ds) == 0
    if empty:
        raise EmptyDatasetError(f"no documents left in {what}")


def load_documents(cfg, split: str = "train", *, process_index: int = 0, process_count: int = 1) -> Documents:
    """This process's share of one split of `cfg.source` (cfg is a DataConfig): a dataset with column "text".

    Raises DataFileNotFoundError (missing file, glob matching nothing), MissingFieldError, EmptyDatasetError
    (nothing left after dropping empty documents, the split, or sharding), DataError (unreadable data). Invalid
    UTF-8 is replaced, counted in `Documents.invalid_utf8_bytes` and warned about, naming each file.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside [0, process_count={process_count})")
    if split == "validation" and cfg.validation_fraction == 0:
        raise EmptyDatasetError("the validation split is empty because data.validation_fraction=0; set it > 0")
    clean_dir = os.path.join(_cache_root(cfg.cache_dir), "jaxctx-utf8")
    files: list[str] = []
    bad_bytes = 0
    hash_split = True  # split by document text unless the split was already made by file name

    if cfg.source == STDLIB:
        description = "the stdlib corpus"
        root, all_files = stdlib_files()
        files = [f for f in all_files if in_split(os.path.relpath(f, root), split, cfg.validation_fraction)]
        if cfg.max_documents:
            files = files[: cfg.max_documents]  # before loading: a small subset loads (and caches) quickly
        files, bad_bytes = clean_utf8(files, clean_dir)
        ds = _load("text", cfg, description, data_files=files, sample_by="document")
        hash_split = False
    elif cfg.source.startswith(HUB_PREFIX):
        name = cfg.source[len(HUB_PREFIX):]
        description = f"hub dataset {name!r}"
        ds = _load(name, cfg, description, **({"name": cfg.hub_subset} if cfg.hub_subset else {}))
        ds = _select_text(ds, cfg.text_field, description)
    else:
        description = cfg.source
        files = resolve_files(cfg.source)
        fmt = guess_format(files, cfg.format)
        if fmt in ("text", "json"):
            files, bad_bytes = clean_utf8(files, clean_dir)
        kwargs = {"sample_by": cfg.text_unit} if fmt == "text" else {}
        ds = _load(fmt, cfg, description, data_files=files, **kwargs)
        ds = _select_text(ds, "text" if fmt == "text" else cfg.text_field, description)

    streaming = isinstance(ds, datasets.IterableDataset)
    if not streaming:
        _check_nonempty(ds, f"{description}: it has no rows")
    # Map-style filters run once and are cached; streaming filters run lazily as documents stream by.
    procs = {} if streaming else {"num_proc": _workers(len(ds), cfg.num_proc)}
    ds = ds.filter(_nonempty, batched=True, **procs)
    _check_nonempty(ds, f"{description} after dropping empty documents")
    if hash_split:
        ds = ds.filter(_split_filter, batched=True, fn_kwargs={"split": split,
                       "validation_fraction": cfg.validation_fraction}, **procs)
    _check_nonempty(ds, f"the {split} split of {description} (data.validation_fraction={cfg.validation_fraction})")
    if cfg.max_documents and cfg.source != STDLIB:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    if process_count > 1:
        # Map-style: a contiguous 1/process_count of the rows. Streaming: whole shards (files) when their count
        # divides process_count, else every process reads all and keeps one document in process_count.
        if not streaming and len(ds) < process_count:
            raise EmptyDatasetError(f"the {split} split of {description} has {len(ds)} documents, fewer than "
                                    f"the {process_count} processes reading it; use more data")
        ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
        if streaming:
            _check_nonempty(ds, f"process {process_index}'s share of the {split} split of {description}")
    return Documents(dataset=ds, description=description, files=files, invalid_utf8_bytes=bad_bytes)
