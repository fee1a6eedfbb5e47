"""Packing tokenized documents into fixed `[rows, seq_len]` arrays with document masks.

The packed stream is every document followed by one separator token (EOS for causal LMs, SEP for BERT), one
document after another. Row j of an epoch is stream positions `[j*T, (j+1)*T)`; a document longer than T simply
continues in row j+1 (nothing is truncated or dropped), so only the very last row of an epoch holds padding.
With `data.align_documents` every document starts a row instead, and the tail of its last row is padding: a
document of up to T - 1 tokens is then never split across rows (synthetic retrieval documents need the needle
and the question in one row).

Batch format (numpy, `[B, T]` with B = this process's share of the global batch, T = `data.seq_len`):

    input_ids     int32    token ids; padding positions hold the tokenizer's pad id (BERT: after MLM masking)
    targets       int32    causal LM: the NEXT token, already shifted (targets[:, t] = stream[t + 1], where the
                           last column looks one token into the next row); BERT: the original token at every
                           position (only masked positions are scored)
    loss_mask     float32  1.0 where `targets` is scored: causal LM: t and t+1 belong to the same document (so
                           no token predicts across a document boundary and padding is never scored); BERT: the
                           positions chosen by MLM masking. Loss = sum(ce * loss_mask) / sum(loss_mask).
    segment_ids   int32    1, 2, ... for the documents of a row in order; 0 for padding. Attention is allowed
                           iff segment ids are equal (the ops.attention contract), so padding is its own segment.
    positions     int32    index of the token within its document, restarting at 0 for each document. A
                           document continued from the previous row restarts at 0 too: a row never needs
                           positions >= T, which keeps learned position tables (gpt2, bert) at T rows.
    token_type_ids int32   BERT only: all 0 (single-segment MLM; no next-sentence task)

So the model is fed `input_ids, segment_ids, positions` and the loss needs no shifting. The separator is part
of the document it ends: its segment id is the document's and predicting it is scored.

This module is pure numpy: `assemble_rows` turns stream windows into the arrays above, `TokenStore` gives random
access to the tokens of a tokenized Arrow dataset, `PackedLayout` maps an epoch's row numbers to stream windows
(map-style datasets: any row in O(1), which makes resuming free), `StreamPacker` packs an iterator of documents
(streaming datasets: rows in order).
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np

from jaxctx.data.errors import DataError


def check_seq_len(seq_len: int) -> None:
    """seq_len must be >= 2: a causal target needs a token and its successor in one row."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"data.seq_len={seq_len!r} must be an integer >= 2 (next-token targets need two tokens)")


def assemble_rows(tokens: np.ndarray, unit: np.ndarray, offset: np.ndarray, valid: np.ndarray, *, pad_id: int,
                  causal: bool) -> dict[str, np.ndarray]:
    """Stream windows -> batch arrays (see the module docstring).

    Args (all `[R, T+1]`: a row's T positions plus one lookahead position for the causal target):
      tokens: token id at each stream position (anything where not valid).
      unit:   a document counter, non-decreasing along the stream: equal values = the same document.
      offset: index of the token within its document (the separator is at offset = document length).
      valid:  False past the end of the stream (padding).
    """
    seq_len = tokens.shape[1] - 1
    tok, uni, off, val = tokens[:, :seq_len], unit[:, :seq_len], offset[:, :seq_len], valid[:, :seq_len]
    first = uni == uni[:, :1]  # the row's first document may have started in an earlier row
    batch = {
        "input_ids": np.where(val, tok, pad_id).astype(np.int32),
        # [R, T]: documents numbered from 1 within the row; padding 0
        "segment_ids": np.where(val, uni - uni[:, :1] + 1, 0).astype(np.int32),
        # [R, T]: restart at 0 per document and per row (a continued document counts from the row start)
        "positions": np.where(val, np.where(first, off - off[:, :1], off), 0).astype(np.int32),
    }
    if causal:
        nxt_val = valid[:, 1:]
        batch["targets"] = np.where(nxt_val, tokens[:, 1:], pad_id).astype(np.int32)
        # scored iff this token and the next are real tokens of the same document
        batch["loss_mask"] = (val & nxt_val & (unit[:, 1:] == uni)).astype(np.float32)
    else:
        batch["targets"] = batch["input_ids"].copy()  # MLM replaces input_ids and sets loss_mask
        batch["loss_mask"] = np.zeros(tok.shape, np.float32)
    return batch


class TokenStore:
    """Random access to the `input_ids` column of a tokenized map-style dataset, without copying it.

    The column is a chunked Arrow list array, memory-mapped from the datasets cache; each chunk's flat values are
    viewed as numpy zero-copy, so a corpus larger than RAM costs only page cache.
    """

    def __init__(self, dataset, column: str = "input_ids"):
        if getattr(dataset, "_indices", None) is not None:  # a filtered/selected view: materialise the rows
            dataset = dataset.flatten_indices()
        chunks = dataset.data.column(column).chunks
        self.values: list[np.ndarray] = []  # per chunk: [tokens in chunk] int32
        doc_chunk, doc_start, lengths = [], [], []
        for c, chunk in enumerate(chunks):
            lens = chunk.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
            self.values.append(chunk.flatten().to_numpy(zero_copy_only=False))
            doc_chunk.append(np.full(len(lens), c, np.int32))
            doc_start.append(np.cumsum(lens) - lens)
            lengths.append(lens)
        self.doc_chunk = np.concatenate(doc_chunk) if doc_chunk else np.zeros(0, np.int32)  # [D]
        self.doc_start = np.concatenate(doc_start) if doc_start else np.zeros(0, np.int64)  # [D] within chunk
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # [D] tokens per document

    def add_documents(self, docs: list[np.ndarray]) -> None:
        """Append in-memory documents (token id arrays) as one more chunk: synthetic data mixed into the corpus."""
        if not docs:
            return
        lens = np.array([len(d) for d in docs], np.int64)
        self.values.append(np.concatenate(docs).astype(np.int32, copy=False))
        self.doc_chunk = np.concatenate([self.doc_chunk, np.full(len(lens), len(self.values) - 1, np.int32)])
        self.doc_start = np.concatenate([self.doc_start, np.cumsum(lens) - lens])
        self.lengths = np.concatenate([self.lengths, lens])

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def document(self, doc: int) -> np.ndarray:
        """All tokens of one document (a view)."""
        start = self.doc_start[doc]
        return self.values[self.doc_chunk[doc]][start:start + self.lengths[doc]]

    def gather(self, doc: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """tokens[i] = token `offset[i]` of document `doc[i]` (same shapes; offsets must be in range)."""
        index = self.doc_start[doc] + offset
        if len(self.values) == 1:
            return self.values[0][index].astype(np.int32, copy=False)
        out = np.empty(doc.shape, np.int32)
        chunk = self.doc_chunk[doc]
        for c in np.unique(chunk):  # usually one or two chunks per batch
            sel = chunk == c
            out[sel] = self.values[c][index[sel]]
        return out


class PackedLayout:
    """One epoch's packed stream over a TokenStore: documents in `order`, each followed by the separator.

    Row j covers stream positions [j*T, (j+1)*T] (one lookahead). Locating a row is a binary search over document
    start positions, so any row of any epoch can be built directly: the iterator state is just a row counter.

    With `align=True` every document starts a new row: a document's units are rounded up to whole rows, the gap
    after its separator is padding, and the row count, sum of ceil((length + 1) / T), is again the same for
    every order.
    """

    def __init__(self, store: TokenStore, order: np.ndarray, seq_len: int, separator: int, *, align: bool = False):
        check_seq_len(seq_len)
        self.store, self.order, self.seq_len, self.separator = store, order, seq_len, separator
        unit_len = store.lengths[order] + 1  # each document plus its separator
        if align:
            unit_len = -(-unit_len // seq_len) * seq_len  # whole rows: the next document starts a row
        self.starts = np.concatenate([[0], np.cumsum(unit_len)])  # [D+1] stream position of each document
        self.total = int(self.starts[-1])  # stream length; the same for every order
        self.num_rows = -(-self.total // seq_len)  # ceil: the last row is padded

    def windows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, unit, offset, valid), each [len(rows), T+1], for these row numbers (>= num_rows: padding)."""
        pos = np.asarray(rows, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [R, T+1]
        valid = pos < self.total
        unit = np.searchsorted(self.starts, pos, side="right") - 1
        unit = np.minimum(unit, len(self.order) - 1)  # positions past the end: clamp, then mask by `valid`
        offset = pos - self.starts[unit]
        doc = self.order[unit]
        valid &= offset <= self.store.lengths[doc]  # past the separator: an aligned document's row tail
        is_text = valid & (offset < self.store.lengths[doc])  # else the separator (or padding)
        tokens = np.full(pos.shape, self.separator, np.int32)
        tokens[is_text] = self.store.gather(doc[is_text], offset[is_text])
        return tokens, unit, offset, valid


class StreamPacker:
    """Packs an iterator of documents (token arrays) into rows in stream order, for streaming datasets (`align`: as
    in PackedLayout, every document starts a row).

    Keeps only the documents overlapping the current row. When `docs` ends, the last row is padded and
    `exhausted` becomes True; a training pipeline passes an endless iterator (epoch after epoch) instead.
    """

    def __init__(self, docs: Iterator[np.ndarray], seq_len: int, separator: int, *, align: bool = False):
        check_seq_len(seq_len)
        self.docs, self.seq_len, self.separator, self.align = docs, seq_len, separator, align
        self.pending: deque[tuple[int, np.ndarray]] = deque()  # (unit id, tokens + separator)
        self.pos = 0  # offset of the next row's first token within pending[0]
        self.next_unit = 0
        self.done = False  # `docs` ran out

    @property
    def exhausted(self) -> bool:
        """No tokens left: every further row would be pure padding."""
        self._fill(1)
        return self.done and not self.pending

    def _fill(self, need: int) -> None:
        """Pull documents until the pending ones hold `need` tokens from `pos` (or the input ends)."""
        have = sum(len(a) for _, a in self.pending) - self.pos
        while have < need and not self.done:
            doc = next(self.docs, None)
            if doc is None:
                self.done = True
                break
            arr = np.append(np.asarray(doc, np.int32), np.int32(self.separator))
            if self.align:  # pad to whole rows with -1 (padding) so the next document starts a row
                arr = np.pad(arr, (0, -len(arr) % self.seq_len), constant_values=-1)
            self.pending.append((self.next_unit, arr))
            self.next_unit += 1
            have += len(arr)

    def _advance(self) -> None:
        """Move the row start forward by T, dropping documents left entirely behind."""
        self.pos += self.seq_len
        while self.pending and self.pos >= len(self.pending[0][1]):
            self.pos -= len(self.pending[0][1])
            self.pending.popleft()
        if not self.pending:
            self.pos = 0

    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, unit, offset, valid), each [T+1], for the next row; then advance by T."""
        width = self.seq_len + 1
        self._fill(width)
        tokens = np.zeros(width, np.int32)
        unit = np.full(width, self.next_unit, np.int64)  # padding: a unit after every document
        offset = np.zeros(width, np.int64)
        filled, start = 0, self.pos
        for uid, arr in self.pending:
            if filled == width:
                break
            k = min(len(arr) - start, width - filled)
            tokens[filled:filled + k] = arr[start:start + k]
            unit[filled:filled + k] = uid
            offset[filled:filled + k] = np.arange(start, start + k)
            filled, start = filled + k, 0
        valid = (np.arange(width) < filled) & (tokens >= 0)  # -1: an aligned document's row tail
        tokens[~valid] = 0
        self._advance()
        return tokens, unit, offset, valid

    def windows(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`count` rows stacked: each [count, T+1]."""
        parts = [self.window() for _ in range(count)]
        return tuple(np.stack(p) for p in zip(*parts))  # type: ignore[return-value]

    def skip(self, count: int) -> None:
        """Advance `count` rows without building them (resume by replay)."""
        for _ in range(count):
            self._fill(self.seq_len + 1)
            self._advance()
