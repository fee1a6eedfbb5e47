"""The labelled-data pipeline of task models: examples -> labels checked -> token ids -> packed rows -> batches.

    it = build_task_iterator(cfg, "train")   # what jaxctx.data.build_iterator returns when model.task != lm
    batch = next(it)                         # the task-batch contract (jaxctx.data.task_packing)
    it.labels                                # LabelSet: names in id order (labels.json, predict, exports)
    it.last_examples                         # [B, E] example index of each slot of the last batch (-1 empty)
    it.get_state() / it.set_state(s) / it.seek(step)

Sources (`data.source`): a JSON/JSONL, CSV or parquet file, a glob, a directory, or `hub:NAME`. Columns:
classification (`data.task=classification`) reads `data.text_field` [+ `data.text_pair_field`] and
`data.label_field`; tagging (`data.task=tagging`) reads `data.tokens_field` (a list of words) and
`data.tags_field` (one tag per word). The validation split is, in order of preference: files whose name starts
with "validation" / "valid" / "dev" (the train split is then the files starting with "train", or all others), a
hub dataset's `validation` split, else a held-out `data.validation_fraction` of the examples chosen by a hash
of their content (jaxctx.data.sources.in_split).

The label set is collected once from the whole train split (before host sharding, so every host agrees) and the
validation split is checked against it (jaxctx.data.labels). Encoding is one cached `datasets.map`
(jaxctx.data.task_encode). Determinism and resume follow jaxctx.data.pipeline: each process reads a contiguous
share of the examples; epoch e's order is a permutation seeded by (train.seed, process, e) (validation: file
order); the state is the number of rows consumed, so `seek(step)` restores the exact next batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import numpy as np

from jaxctx.config import TASK_DATA
from jaxctx.data import task_encode
from jaxctx.data.errors import DataError, EmptyDatasetError, MissingFieldError
from jaxctx.data.global_batch import local_batch_size
from jaxctx.data.labels import LabelSet, collect_labels
from jaxctx.data.packing import check_seq_len
from jaxctx.data.sources import (HUB_PREFIX, SPLITS, STDLIB, _cache_root, _load, _workers, clean_utf8, guess_format,
                                 in_split, resolve_files)
from jaxctx.data.task_packing import PACK_OPEN_ROWS, ExampleStore, pack_rows
from jaxctx.data.tokenizer import check_vocab, load_tokenizer

STATE_VERSION = 1  # of get_state(); the same keys as jaxctx.data.pipeline
VALIDATION_NAMES = ("validation", "valid", "dev")
_CSV_EXT = (".csv", ".tsv")


def _columns(data_cfg) -> list[str]:
    """The columns a data.task reads."""
    if data_cfg.task == "tagging":
        return [data_cfg.tokens_field, data_cfg.tags_field]
    return [data_cfg.text_field] + ([data_cfg.text_pair_field] if data_cfg.text_pair_field else []) + [
        data_cfg.label_field]


def _split_files(files: list[str], split: str) -> list[str] | None:
    """Files of `split` when the names say so (validation*, valid*, dev* vs the rest), else None."""
    def is_validation(path: str) -> bool:
        return os.path.basename(path).lower().startswith(VALIDATION_NAMES)

    held = [f for f in files if is_validation(f)]
    if not held:
        return None
    if split == "validation":
        return held
    rest = [f for f in files if not is_validation(f)]
    named = [f for f in rest if os.path.basename(f).lower().startswith("train")]
    return named or rest


def _content_key(columns: list[str]):
    def key(example: dict) -> str:
        return "\x1f".join(str(example[c]) for c in columns)
    return key


def _hash_split(batch: dict, columns: list[str], split: str, validation_fraction: float) -> list[bool]:
    key = _content_key(columns)
    n = len(batch[columns[0]])
    return [in_split(key({c: batch[c][i] for c in columns}), split, validation_fraction) for i in range(n)]


def read_files(data_cfg, files: list[str], description: str, columns: list[str]):
    """A map-style dataset of labelled files (JSON/JSONL, CSV/TSV or parquet; data.format overrides the guess)."""
    fmt = data_cfg.format or ("csv" if all(f.lower().endswith(_CSV_EXT) for f in files) else None)
    fmt = guess_format(files, fmt)
    if fmt == "text":
        raise DataError(f"{description} holds text files; labelled data must be JSON/JSONL, CSV or parquet with "
                        f"the columns {', '.join(columns)} (or set data.format)")
    if fmt in ("json", "csv"):
        files, _ = clean_utf8(files, os.path.join(_cache_root(data_cfg.cache_dir), "jaxctx-utf8"))
    kwargs = {"delimiter": "\t"} if fmt == "csv" and all(f.lower().endswith(".tsv") for f in files) else {}
    return _load(fmt, dataclasses.replace(data_cfg, streaming=False), description, data_files=files, **kwargs)


def check_columns(data_cfg, ds, columns: list[str], description: str) -> None:
    """MissingFieldError naming the first absent column and the config key that names it; EmptyDatasetError."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        key = {data_cfg.label_field: "data.label_field", data_cfg.text_field: "data.text_field",
               data_cfg.tokens_field: "data.tokens_field", data_cfg.tags_field: "data.tags_field",
               data_cfg.text_pair_field: "data.text_pair_field"}[missing[0]]
        raise MissingFieldError(f"column {missing[0]!r} is not in {description}; its columns are "
                                f"{', '.join(ds.column_names) or 'none'} (set {key})")
    if len(ds) == 0:
        raise EmptyDatasetError(f"{description} has no examples")


def load_examples(data_cfg, split: str):
    """(dataset of one split with the task's columns, description). Raises DataError / MissingFieldError."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if data_cfg.streaming:
        raise DataError("data.streaming=true is not supported for labelled data (data.task); labelled sets are "
                        "loaded as memory-mapped Arrow files: set data.streaming=false")
    if data_cfg.source == STDLIB:
        raise DataError(f"data.task={data_cfg.task} needs labelled data, not the unlabelled stdlib corpus; make "
                        f"one with `jaxctx data make-task stdlib-package --out DIR` and set data.source=DIR")
    columns = _columns(data_cfg)
    hash_split = True
    if data_cfg.source.startswith(HUB_PREFIX):
        import datasets

        name = data_cfg.source[len(HUB_PREFIX):]
        description = f"hub dataset {name!r}"
        kwargs = {"name": data_cfg.hub_subset} if data_cfg.hub_subset else {}
        try:
            ds = datasets.load_dataset(name, split=split, cache_dir=data_cfg.cache_dir, **kwargs)
            hash_split = False
        except ValueError:  # no such split: hold out a fraction of train
            ds = datasets.load_dataset(name, split="train", cache_dir=data_cfg.cache_dir, **kwargs)
    else:
        files = resolve_files(data_cfg.source)
        named = _split_files(files, split)
        if named is not None:
            files, hash_split = named, False
        description = f"{data_cfg.source} ({split})"
        ds = read_files(data_cfg, files, description, columns)
    check_columns(data_cfg, ds, columns, description)
    ds = ds.select_columns(columns)
    if hash_split:
        if data_cfg.validation_fraction == 0 and split == "validation":
            raise EmptyDatasetError(f"{description} has no validation file and data.validation_fraction=0; "
                                    f"add a validation file or set data.validation_fraction > 0")
        ds = ds.filter(_hash_split, batched=True, fn_kwargs={"columns": columns, "split": split,
                       "validation_fraction": data_cfg.validation_fraction})
        description = f"{description}, {split} split (data.validation_fraction={data_cfg.validation_fraction})"
    if data_cfg.max_documents:
        ds = ds.select(range(min(data_cfg.max_documents, len(ds))))
    if len(ds) == 0:
        raise EmptyDatasetError(f"no examples in the {split} split of {description}")
    return ds, description


def label_set(cfg, train_ds, description: str) -> LabelSet:
    """The label set of the train split (jaxctx.data.labels rules)."""
    data, model = cfg.data, cfg.model
    tagging = data.task == "tagging"
    field = data.tags_field if tagging else data.label_field
    return collect_labels(train_ds[field], field=field, description=description, num_labels=model.num_labels,
                          id2label=model.id2label, nested=tagging or model.problem == "multi_label",
                          regression=model.problem == "regression")


class TaskIterator:
    """Packed labelled batches for one process; see the module docstring. Build with `build_task_iterator`."""

    def __init__(self, cfg, split: str = "train", *, process_index: int = 0, process_count: int = 1,
                 repeat: bool = True, examples=None, labels: LabelSet | None = None):
        """`examples` = (dataset, description) with `labels` replace the split and the collected label set
        (`jaxctx predict`); everything else as the module docstring says."""
        from datasets.distributed import split_dataset_by_node

        start = time.perf_counter()
        data = cfg.data
        if data.task is None:
            raise DataError(f"model.task={cfg.model.task} needs labelled data: set data.task="
                            f"{TASK_DATA.get(cfg.model.task, 'classification')} and a labelled data.source")
        check_seq_len(data.seq_len)
        self.cfg, self.split, self.repeat = cfg, split, repeat
        self.seq_len, self.max_examples = data.seq_len, data.max_examples_per_row
        self.seed, self.process_index, self.process_count = cfg.train.seed, process_index, process_count
        self.local_batch = local_batch_size(cfg.train.batch_size, process_count)
        self.tagging = data.task == "tagging"
        self.bert = not cfg.model.causal
        self.tokenizer = load_tokenizer(data.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        specials = task_encode.Specials.of(self.tokenizer, cfg.model.causal)

        if examples is not None:  # `jaxctx predict`: given examples, in their order, and the trained label set
            (ds, self.description), self.labels = examples, labels
        else:
            train_ds, train_desc = load_examples(data, "train")
            self.labels = label_set(cfg, train_ds, train_desc)
            ds, self.description = (train_ds, train_desc) if split == "train" else load_examples(data, split)
        label2id = self.labels.label2id if self.labels.kind == "names" else None
        common = dict(tokenizer=self.tokenizer, specials=specials, seq_len=self.seq_len, label2id=label2id,
                      num_labels=cfg.model.num_labels, description=self.description)
        if self.tagging:
            fn, kwargs = task_encode.encode_tagging, dict(tokens_field=data.tokens_field, tags_field=data.tags_field)
        else:
            fn, kwargs = task_encode.encode_classification, dict(
                text_field=data.text_field, pair_field=data.text_pair_field, label_field=data.label_field,
                problem=cfg.model.problem)
        self.dataset = ds  # the raw examples (predict reads their text)
        if process_count > 1:
            if len(ds) < process_count:
                raise EmptyDatasetError(f"the {split} split of {self.description} has {len(ds)} examples, fewer "
                                        f"than the {process_count} processes reading it")
            ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
        tokenize_start = time.perf_counter()
        encoded = ds.map(fn, batched=True, with_indices=True, fn_kwargs={**common, **kwargs},
                         remove_columns=ds.column_names, num_proc=_workers(len(ds), data.num_proc),
                         desc=f"encode {data.task} ({self.tokenizer.name})")
        self.store = ExampleStore(encoded, tagging=self.tagging, problem=cfg.model.problem,
                                  pad_id=self.tokenizer.special.padding(cfg.model.causal))
        self.shuffle = data.shuffle and split == "train" and examples is None
        # Rows are packed once (from a seeded permutation when shuffling) and each epoch visits them in a new
        # order: the row count is the same every epoch, so any step's rows are found in O(1) on resume.
        n = self.store.num_examples
        self.order = (np.random.default_rng([self.seed, process_index]).permutation(n) if self.shuffle
                      else np.arange(n))
        open_rows = 1 if examples is not None else PACK_OPEN_ROWS  # predict: rows strictly in input order
        self.packed, self.bounds = pack_rows(self.store.lengths, self.order, self.seq_len, self.max_examples,
                                             open_rows)  # [N] example ids row after row, [R+1]
        self.rows_per_epoch = len(self.bounds) - 1
        self._row_orders: dict[int, np.ndarray] = {}
        now = time.perf_counter()
        self.tokenize_s, self.prepare_s = now - tokenize_start, now - start
        self._rows = self._batches = 0
        self._batch_s = 0.0
        self._tokens = self._real = 0
        self.last_examples = np.zeros((0, self.max_examples), np.int64)

    def _row_order(self, epoch: int) -> np.ndarray:
        """The order rows are visited in epoch `epoch`: a permutation seeded by (seed, process, epoch)."""
        if not self.shuffle:
            return np.arange(self.rows_per_epoch)
        if epoch not in self._row_orders:
            self._row_orders = {k: v for k, v in self._row_orders.items() if k >= epoch - 1}  # keep at most two
            rng = np.random.default_rng([self.seed, self.process_index, epoch, 0x5441534B])  # "TASK"
            self._row_orders[epoch] = rng.permutation(self.rows_per_epoch)
        return self._row_orders[epoch]

    def __iter__(self) -> "TaskIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.repeat and self._rows >= self.rows_per_epoch:
            raise StopIteration
        start = time.perf_counter()
        rows = []
        for index in range(self._rows, self._rows + self.local_batch):
            epoch, row = divmod(index, self.rows_per_epoch)
            if epoch > 0 and not self.repeat:
                rows.append(np.zeros(0, np.int64))  # past the single pass: an empty (all padding) row
                continue
            row = self._row_order(epoch)[row]
            rows.append(self.packed[self.bounds[row]:self.bounds[row + 1]])
        batch, self.last_examples = self.store.assemble(rows, self.seq_len, self.max_examples, self.bert)
        self._rows += self.local_batch
        self._batches += 1
        self._batch_s += time.perf_counter() - start
        self._tokens += batch["input_ids"].size
        self._real += int((batch["segment_ids"] > 0).sum())
        return batch

    # state: the same dict as jaxctx.data.pipeline.DataIterator, so checkpoints treat both alike
    def get_state(self) -> dict[str, Any]:
        """The position as a small JSON-able dict (identical on every process)."""
        return {"version": STATE_VERSION, "rows": self._rows, "batches": self._batches,
                "process_count": self.process_count, "split": self.split}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue exactly after the batch at which `state` was taken."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} is not {STATE_VERSION}")
        self._seek(int(state["rows"]), int(state["batches"]))

    def seek(self, batches: int) -> None:
        """Position after `batches` batches (the global step)."""
        self._seek(batches * self.local_batch, batches)

    def _seek(self, rows: int, batches: int) -> None:
        if rows < 0 or batches < 0:
            raise DataError(f"cannot seek to a negative position ({rows} rows, {batches} batches)")
        self._rows, self._batches = rows, batches

    def stats(self) -> dict[str, Any]:
        """Numbers for logs and `jaxctx data inspect` (packing efficiency = real tokens / token slots)."""
        lengths = self.store.lengths
        return {
            "batches": self._batches,
            "batch_shape": [self.local_batch, self.seq_len],
            "tokens": self._tokens,
            "padding_fraction": 1 - self._real / self._tokens if self._tokens else 0.0,
            "tokens_per_sec": self._tokens / self._batch_s if self._batch_s else 0.0,
            "prepare_s": self.prepare_s,
            "tokenize_s": self.tokenize_s,
            "documents": self.store.num_examples,
            "examples": self.store.num_examples,
            "truncated_examples": int(self.store.truncated.sum()),
            "corpus_tokens": int(lengths.sum()),
            "rows_per_epoch": self.rows_per_epoch,
            "packing_efficiency": float(lengths.sum()) / (self.rows_per_epoch * self.seq_len),
            "examples_per_row": self.store.num_examples / self.rows_per_epoch,
            "labels": list(self.labels.names),
            "invalid_utf8_bytes": 0,
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.name,
            "source": self.description,
            "split": self.split,
        }


def build_task_iterator(cfg, split: str = "train", *, process_index: int = 0, process_count: int = 1,
                        repeat: bool = True, state: Mapping[str, Any] | None = None) -> TaskIterator:
    """The labelled-batch iterator for this process (see the module docstring)."""
    it = TaskIterator(cfg, split, process_index=process_index, process_count=process_count, repeat=repeat)
    if state is not None:
        it.set_state(state)
    return it
