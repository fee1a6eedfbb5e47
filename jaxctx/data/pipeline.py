"""The training input pipeline: documents -> tokens -> packed rows -> [MLM] -> this process's batch.

    it = build_iterator(cfg, "train")          # this process's share; checks the vocab against the model
    batch = next(it)                           # dict of numpy [B_local, T] arrays, see jaxctx.data.packing
    state = it.get_state()                     # small JSON-able dict for the checkpoint
    it.set_state(state)  /  it.seek(step)      # continue with exactly the next batch

Tokenization is one batched `datasets.map` over the whole split with `data.num_proc` processes; its output is
cached as Arrow files next to the loaded data (fingerprinted by the data, the tokenizer and this code's map
function), so a second run starts in about a second. Packing then only gathers token ids (packing.TokenStore).

Determinism and resume. Every process reads its own contiguous share of the documents
(`split_dataset_by_node`) and packs it into its own stream; epoch e's document order and row order are
permutations drawn from numpy Generators seeded with (train.seed, process index, e). Batch k of a process is
rows [k*B_local, (k+1)*B_local) of that process's endless sequence of epochs. So the position of *every* process
after k batches is the same number, k, and the state dict is identical on all hosts: saving only process 0's copy
(what Orbax's JSON item keeps) loses nothing, and `seek(global_step)` alone restores the pipeline. Restoring a
map-style pipeline costs O(1) (rows are located by binary search); a streaming pipeline replays its stream up
to the saved row (tokenizing what it skips), which is exact but proportional to the data already seen.
Changing the number of processes re-shards the documents, so a resume with another process count continues
from the same step with a different (still disjoint) order; this is warned about.

Validation batches come from the held-out split (sources.py), unshuffled. Both splits repeat forever by default,
so every process always yields a batch (multi-host steps never desynchronise); pass `repeat=False` for one
exact pass on a single host.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from jaxctx.data import mlm, nsp
from jaxctx.data.errors import DataError, EmptyDatasetError
from jaxctx.data.global_batch import local_batch_size  # noqa: F401  (re-exported: jaxctx.data.local_batch_size)
from jaxctx.data.packing import PackedLayout, StreamPacker, TokenStore, assemble_rows, check_seq_len
from jaxctx.data.passkey_docs import passkey_documents, passkey_token_budget
from jaxctx.data.sources import Documents, _workers, load_documents
from jaxctx.data.tokenizer import Tokenizer, check_vocab, load_tokenizer

STATE_VERSION = 1


def _tokenize(batch: dict, tokenizer: Tokenizer) -> dict:
    """datasets.map function (module level so it is fingerprinted and picklable for num_proc)."""
    return {"input_ids": tokenizer.encode_batch(batch["text"])}


def _token_features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


class _MapSource:
    """Rows of a map-style (memory-mapped) tokenized dataset: any row of any epoch in O(1)."""

    def __init__(self, tokenized, seq_len: int, separator: int, *, seed: int, process_index: int, shuffle: bool,
                 extra_documents: Callable[[int], list[np.ndarray]] | None = None, align: bool = False):
        self.store = TokenStore(tokenized)
        if self.store.num_tokens == 0:
            raise EmptyDatasetError("every document tokenized to zero tokens")
        self.source_documents = self.store.num_documents
        if extra_documents is not None:  # synthetic documents, sized from the corpus's token count
            self.store.add_documents(extra_documents(self.store.num_tokens))
        self.seq_len, self.separator, self.shuffle, self.align = seq_len, separator, shuffle, align
        self.seed, self.process_index = seed, process_index
        self._layouts: dict[int, tuple[PackedLayout, np.ndarray]] = {}
        self.rows_per_epoch = self._layout(0)[0].num_rows

    def _layout(self, epoch: int) -> tuple[PackedLayout, np.ndarray]:
        """(layout, row order) of one epoch, from a Generator seeded by (seed, process, epoch)."""
        if epoch not in self._layouts:
            n_docs = self.store.num_documents
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.process_index, epoch])
                order = rng.permutation(n_docs)
                layout = PackedLayout(self.store, order, self.seq_len, self.separator, align=self.align)
                rows = rng.permutation(layout.num_rows)  # so one long document does not fill a whole batch
            else:
                layout = PackedLayout(self.store, np.arange(n_docs), self.seq_len, self.separator,
                                      align=self.align)
                rows = np.arange(layout.num_rows)
            self._layouts = {k: v for k, v in self._layouts.items() if k >= epoch - 1}  # keep at most two
            self._layouts[epoch] = (layout, rows)
        return self._layouts[epoch]

    def windows(self, first: int, count: int, repeat: bool):
        """Windows of rows first .. first+count-1 of this process's endless (or single-epoch) row sequence."""
        index = first + np.arange(count)
        width = self.seq_len + 1
        out = (np.zeros((count, width), np.int32), np.zeros((count, width), np.int64),
               np.zeros((count, width), np.int64), np.zeros((count, width), bool))
        epochs = index // self.rows_per_epoch
        if not repeat:
            epochs = np.where(epochs > 0, -1, 0)  # rows past the single epoch stay padding (valid=False)
        for epoch in np.unique(epochs[epochs >= 0]):
            layout, rows = self._layout(int(epoch))
            sel = epochs == epoch
            for dst, src in zip(out, layout.windows(rows[index[sel] % self.rows_per_epoch])):
                dst[sel] = src
        return out


class _StreamSource:
    """Rows of a streaming tokenized dataset, in stream order; resume = replay from the start."""

    def __init__(self, tokenized, seq_len: int, separator: int, *, repeat: bool, description: str,
                 align: bool = False):
        self.tokenized, self.seq_len, self.separator, self.align = tokenized, seq_len, separator, align
        self.repeat, self.description = repeat, description
        self.rows_per_epoch = None  # unknown until a stream has been read once
        self.seek(0)

    def _documents(self) -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            self.tokenized.set_epoch(epoch)  # reseeds the buffered shuffle: a new order each epoch
            count = 0
            for example in self.tokenized:
                count += 1
                yield np.asarray(example["input_ids"], np.int32)
            if count == 0:
                raise EmptyDatasetError(f"the stream of {self.description} yielded no documents (epoch {epoch})")
            if not self.repeat:
                return
            epoch += 1

    def seek(self, row: int) -> None:
        self.packer = StreamPacker(self._documents(), self.seq_len, self.separator, align=self.align)
        self.packer.skip(row)

    def windows(self, first: int, count: int, repeat: bool):
        return self.packer.windows(count)


class DataIterator:
    """Packed batches for one process. Build with `build_iterator`; see the module docstring."""

    def __init__(self, cfg, split: str = "train", *, process_index: int = 0, process_count: int = 1,
                 repeat: bool = True):
        start = time.perf_counter()
        data = cfg.data
        check_seq_len(data.seq_len)
        self.cfg, self.split, self.repeat = cfg, split, repeat
        self.seq_len = data.seq_len
        self.seed = cfg.train.seed
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = local_batch_size(cfg.train.batch_size, process_count)
        self.causal = cfg.model.causal
        self.tokenizer = load_tokenizer(data.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.separator = self.tokenizer.special.separator(self.causal)
        self.pad_id = self.tokenizer.special.padding(self.causal)
        if not self.causal:
            self._random_ids = mlm.random_token_ids(self.tokenizer.vocab_size, self.tokenizer.special_ids)
            if self.tokenizer.special.mask is None:
                raise DataError(f"model.family={cfg.model.family} needs a [MASK] token but tokenizer "
                                f"{self.tokenizer.name!r} has none")
        if data.nsp and (self.tokenizer.special.cls is None or self.tokenizer.special.sep is None):
            raise DataError(f"data.nsp=true needs [CLS] and [SEP] tokens but tokenizer {self.tokenizer.name!r} "
                            f"lacks one")
        shuffle = data.shuffle and split == "train"  # validation: a fixed set, in file order

        self.docs: Documents = load_documents(data, split, process_index=process_index, process_count=process_count)
        ds = self.docs.dataset
        tokenize_start = time.perf_counter()
        if data.streaming:
            if shuffle:
                ds = ds.shuffle(seed=self.seed, buffer_size=max(data.shuffle_buffer, 1))
            ds = ds.map(_tokenize, batched=True, fn_kwargs={"tokenizer": self.tokenizer}, remove_columns=["text"],
                        features=_token_features())
            self._source = _StreamSource(ds, self.seq_len, self.separator, repeat=repeat,
                                         description=self.docs.description, align=data.align_documents)
            self.num_documents = None
        else:
            ds = ds.map(_tokenize, batched=True, fn_kwargs={"tokenizer": self.tokenizer}, remove_columns=["text"],
                        features=_token_features(), num_proc=_workers(len(ds), data.num_proc),
                        desc=f"tokenize ({self.tokenizer.name})")
            self._source = _MapSource(ds, self.seq_len, self.separator, seed=self.seed,
                                      process_index=process_index, shuffle=shuffle,
                                      extra_documents=self._passkey_documents(split, process_index),
                                      align=data.align_documents)
            self.num_documents = self._source.store.num_documents  # passkey documents included
        now = time.perf_counter()
        self.tokenize_s = now - tokenize_start  # ~0 when the tokenized split came from the cache
        self.prepare_s = now - start
        self._rows = 0  # rows consumed by this process: the position (same number on every process)
        self._batches = 0  # batches taken (seeds MLM masking)
        self._batch_s = 0.0  # time spent building batches
        self._tokens = 0  # tokens emitted (rows * T), padding included
        self._padding = 0  # of which padding

    def _passkey_documents(self, split: str, process_index: int) -> Callable[[int], list[np.ndarray]] | None:
        """data.passkey_fraction > 0: a function (corpus tokens -> synthetic passkey documents), see passkey_docs."""
        fraction = self.cfg.data.passkey_fraction
        if fraction <= 0:
            return None
        tokenizer, max_length, seed = self.tokenizer, self.seq_len - 1, self.seed

        def encode(text: str) -> np.ndarray:
            return tokenizer.encode_batch([text])[0]  # no special tokens: packing adds the separator

        def documents(source_tokens: int) -> list[np.ndarray]:
            return passkey_documents(encode, max_length=max_length, seed=seed, split=split,
                                     num_tokens=passkey_token_budget(fraction, source_tokens),
                                     process_index=process_index, max_digits=self.cfg.data.passkey_max_digits,
                                     min_length=self.cfg.data.passkey_min_length,
                                     full_length_fraction=self.cfg.data.passkey_full_length_fraction)

        return documents

    # -------------------------------------------------------------------------------------------------------
    # Iteration
    # -------------------------------------------------------------------------------------------------------

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.repeat and self._finished():
            raise StopIteration
        start = time.perf_counter()
        if self.cfg.data.nsp:  # one sentence pair per row, documents drawn by a Generator seeded per batch
            rng = np.random.default_rng([self.seed, self.process_index, self._batches, 0x4E5350])  # "NSP"
            special = self.tokenizer.special
            batch = nsp.pair_batch(self._source.store, rng, rows=self.local_batch, seq_len=self.seq_len,
                                   cls_id=special.cls, sep_id=special.sep, pad_id=self.pad_id)
        else:
            tokens, unit, offset, valid = self._source.windows(self._rows, self.local_batch, self.repeat)
            batch = assemble_rows(tokens, unit, offset, valid, pad_id=self.pad_id, causal=self.causal)
        if not self.causal:
            rng = np.random.default_rng([self.seed, self.process_index, self._batches, 0x4D4C4D])  # "MLM"
            mlm.mask_tokens(batch, rng, probability=self.cfg.data.mlm_probability,
                            mask_id=self.tokenizer.special.mask, special_ids=self.tokenizer.special_ids,
                            random_ids=self._random_ids)
            batch.setdefault("token_type_ids", np.zeros_like(batch["input_ids"]))
        self._batches += 1
        self._rows += self.local_batch
        self._batch_s += time.perf_counter() - start
        self._tokens += batch["input_ids"].size
        self._padding += int((batch["segment_ids"] == 0).sum())
        return batch

    def _finished(self) -> bool:
        if isinstance(self._source, _StreamSource):
            return self._source.packer.exhausted
        return self._rows >= self._source.rows_per_epoch

    # -------------------------------------------------------------------------------------------------------
    # State
    # -------------------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """A small JSON-able dict; identical on every process (see the module docstring)."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,  # = the global step when one batch is taken per step
            "rows": self._rows,  # rows consumed by each process (the position)
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "source": self.cfg.data.source,
            "tokenizer": self.tokenizer.name,
            "streaming": self.cfg.data.streaming,
            "passkey_fraction": self.cfg.data.passkey_fraction,
            "passkey_max_digits": self.cfg.data.passkey_max_digits,
            "passkey_min_length": self.cfg.data.passkey_min_length,
            "passkey_full_length_fraction": self.cfg.data.passkey_full_length_fraction,
            "align_documents": self.cfg.data.align_documents,
            "process_count": self.process_count,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue with exactly the batch after the one `state` was taken at."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.get_state()
        # states saved before these keys existed had no passkey documents, or 5-digit keys
        state = {"passkey_fraction": 0.0, "passkey_max_digits": 5, "passkey_min_length": 0,
                 "passkey_full_length_fraction": 0.0, "align_documents": False, **state}
        # these change what a row means
        for key in ("split", "seed", "seq_len", "streaming", "passkey_fraction", "passkey_max_digits",
                    "passkey_min_length", "passkey_full_length_fraction", "align_documents"):
            if state.get(key) != mine[key]:
                raise DataError(f"the saved data iterator state has {key}={state.get(key)!r} but this pipeline "
                                f"has {key}={mine[key]!r}; resume with the same data settings or start fresh")
        for key in ("source", "tokenizer"):  # may legitimately move (a relocated directory): warn only
            if state.get(key) != mine[key]:
                warnings.warn(f"the saved data iterator state has {key}={state.get(key)!r}, this pipeline "
                              f"{key}={mine[key]!r}; continuing at the saved position", stacklevel=2)
        if state.get("process_count") != self.process_count:
            warnings.warn(f"resuming a data pipeline saved with {state.get('process_count')} processes (data "
                          f"groups) on {self.process_count}: documents are re-sharded, so the order differs from an "
                          f"uninterrupted run (still disjoint across processes)", stacklevel=2)
        self._seek(int(state["rows"]), batches=int(state["batches"]))

    def seek(self, batches: int) -> None:
        """Position after `batches` batches (the global step) without a saved state: the same on every host."""
        self._seek(batches * self.local_batch, batches=batches)

    def _seek(self, rows: int, batches: int) -> None:
        if rows < 0 or batches < 0:
            raise DataError(f"cannot seek to a negative position ({rows} rows, {batches} batches)")
        # The row counter is the position (exact even if train.batch_size changed); the batch counter only
        # seeds MLM masking.
        if isinstance(self._source, _StreamSource):
            self._source.seek(rows)
        self._rows, self._batches = rows, batches

    # -------------------------------------------------------------------------------------------------------
    # Reporting
    # -------------------------------------------------------------------------------------------------------

    @property
    def rows_per_epoch(self) -> int | None:
        """Packed rows in one epoch of this process's share (None for streaming before the first epoch ends)."""
        return self._source.rows_per_epoch

    def stats(self) -> dict[str, Any]:
        """Throughput and packing numbers so far (for logs and `jaxctx data inspect`)."""
        return {
            "batches": self._batches,
            "batch_shape": [self.local_batch, self.seq_len],
            "tokens": self._tokens,
            "padding_fraction": self._padding / self._tokens if self._tokens else 0.0,
            "tokens_per_sec": self._tokens / self._batch_s if self._batch_s else 0.0,
            "prepare_s": self.prepare_s,
            "tokenize_s": self.tokenize_s,
            "documents": self.num_documents,
            "corpus_tokens": None if self.num_documents is None else self._source.store.num_tokens,
            "rows_per_epoch": self.rows_per_epoch,
            "invalid_utf8_bytes": self.docs.invalid_utf8_bytes,
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.name,
            "source": self._description(),
            "split": self.split,
        }


    def _description(self) -> str:
        """The source's name, plus the synthetic passkey documents mixed in (data.passkey_fraction)."""
        source = getattr(self._source, "source_documents", None)
        if not self.cfg.data.passkey_fraction or source is None:
            return self.docs.description
        return (f"{self.docs.description} + {self._source.store.num_documents - source} passkey documents "
                f"({self.cfg.data.passkey_fraction:.0%} of tokens)")


def build_iterator(cfg, split: str = "train", *, process_index: int | None = None,
                   process_count: int | None = None, repeat: bool = True,
                   state: Mapping[str, Any] | None = None) -> DataIterator:
    """The packed-batch iterator for this process (a resolved `jaxctx.config.Config`).

    process_index/process_count default to `jax.process_index()` / `jax.process_count()`; tests pass them to
    simulate hosts, and the training loop passes the data group's index and count when processes share rows
    (jaxctx.parallel.data_group). `state` (from `get_state`) restores the position. A task model (model.task != lm)
    gets the labelled-batch iterator of jaxctx.data.task instead (same interface). Raises the errors of
    jaxctx.data.errors (all ValueError or FileNotFoundError) for bad data, settings or a vocabulary larger than
    `model.vocab_size`.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if getattr(cfg.model, "task", "lm") != "lm":  # labelled batches for a task head
        from jaxctx.data.task import build_task_iterator

        return build_task_iterator(cfg, split, process_index=process_index, process_count=process_count,
                                   repeat=repeat, state=state)
    it = DataIterator(cfg, split, process_index=process_index, process_count=process_count, repeat=repeat)
    if state is not None:
        it.set_state(state)
    return it
