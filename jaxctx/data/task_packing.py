"""Packing encoded labelled examples several to a row (the task-batch contract of docs/models.md "Task heads").

Examples are placed in order, first fit over the last few open rows (PACK_OPEN_ROWS when training; one row,
i.e. strictly in order, for `jaxctx predict`): an example joins an open row if its tokens fit in the T - used
positions left and the row has fewer than E = data.max_examples_per_row examples; otherwise a new row opens.
Every example is at most T tokens (task_encode truncates), so a long example fills a row alone. Each example is
its own segment (1, 2, ... within the row; padding 0), positions restart at 0 per example, so attention never
crosses examples and the packed logits equal the unpacked ones.

Batch (numpy; B rows of T tokens, E example slots):

    input_ids, segment_ids, positions   int32 [B, T]  (+ token_type_ids int32 [B, T] for bert)
    classification: cls_index int32 [B, E] (row position of the token the head reads), labels [B, E] int32
                    (single_label) | float32 [B, E, N] (multi_label) | float32 [B, E] (regression),
                    label_mask float32 [B, E] (1 = a real example)
    tagging:        labels int32 [B, T] (0 where not scored), loss_mask float32 [B, T]

`ExampleStore` holds the encoded examples (memory-mapped Arrow columns, via packing.TokenStore);
`pack_rows` computes one epoch's rows; `ExampleStore.assemble` builds a batch and says which example sits where.
"""

from __future__ import annotations

import numpy as np

from jaxctx.data.packing import TokenStore

PACK_OPEN_ROWS = 8  # rows an example may still join: short examples fill the gaps long ones leave


def pack_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, max_examples: int,
              open_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(examples, bounds): row r holds examples[bounds[r]:bounds[r+1]] (example indices, [N] and [R+1]).

    Examples are taken in `order`; each goes into the first of the last `open_rows` rows it fits in (tokens and
    example slots), else a new row. open_rows=1 keeps the order exactly (rows are consecutive runs); a few open
    rows fill the gaps a long example leaves, which matters when examples are a sizeable share of a row.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    live: list[int] = []  # indices of the rows still open, oldest first
    for ex, n in zip(order.tolist(), lengths[order].tolist()):
        for r in live:
            if used[r] + n <= seq_len and len(rows[r]) < max_examples:
                break
        else:
            r = len(rows)
            rows.append([])
            used.append(0)
            live.append(r)
            if len(live) > open_rows:
                live.pop(0)
        rows[r].append(ex)
        used[r] += n
        if used[r] == seq_len or len(rows[r]) == max_examples:
            live.remove(r)
    bounds = np.zeros(len(rows) + 1, np.int64)
    bounds[1:] = np.cumsum([len(row) for row in rows])
    examples = np.asarray([ex for row in rows for ex in row], np.int64)
    return examples, bounds


class ExampleStore:
    """Encoded examples of one split: token ids (+ token types, tag ids) and per-example labels."""

    def __init__(self, dataset, *, tagging: bool, problem: str | None, pad_id: int):
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        self.tagging, self.problem, self.pad_id = tagging, problem, pad_id
        self.tokens = TokenStore(dataset, "input_ids")
        self.lengths = self.tokens.lengths  # [N]
        self.truncated = np.asarray(dataset["truncated"], bool)  # [N]
        names = dataset.column_names
        self.token_types = TokenStore(dataset, "token_type_ids") if "token_type_ids" in names else None
        if tagging:
            self.tags = TokenStore(dataset, "tag_ids")
        else:
            dtype = np.int32 if problem == "single_label" else np.float32
            self.labels = np.asarray(dataset["label"], dtype)  # [N] or [N, num_labels] (multi-hot)
            self.cls_offset = np.asarray(dataset["cls_offset"], np.int64)  # [N]

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def assemble(self, rows: list[np.ndarray], seq_len: int, max_examples: int, bert: bool):
        """(batch, examples [B, E] int64: example index in each slot, -1 = empty) for rows of example indices."""
        b = len(rows)
        ids = np.full((b, seq_len), self.pad_id, np.int32)
        seg = np.zeros((b, seq_len), np.int32)
        pos = np.zeros((b, seq_len), np.int32)
        types = np.zeros((b, seq_len), np.int32)
        examples = np.full((b, max_examples), -1, np.int64)
        if self.tagging:
            labels = np.zeros((b, seq_len), np.int32)
            mask = np.zeros((b, seq_len), np.float32)
        else:
            label_shape = (b, max_examples) + self.labels.shape[1:]
            labels = np.zeros(label_shape, self.labels.dtype)
            cls_index = np.zeros((b, max_examples), np.int32)
            label_mask = np.zeros((b, max_examples), np.float32)
        for r, row in enumerate(rows):
            start = 0
            for k, ex in enumerate(row.tolist()):
                n = int(self.lengths[ex])
                span = slice(start, start + n)
                ids[r, span] = self.tokens.document(ex)
                seg[r, span] = k + 1
                pos[r, span] = np.arange(n)
                if self.token_types is not None:
                    types[r, span] = self.token_types.document(ex)
                if self.tagging:
                    tags = self.tags.document(ex)
                    labels[r, span] = np.maximum(tags, 0)  # IGNORE -> 0, unscored
                    mask[r, span] = tags >= 0
                else:
                    cls_index[r, k] = start + self.cls_offset[ex]
                    labels[r, k] = self.labels[ex]
                    label_mask[r, k] = 1.0
                examples[r, k] = ex
                start += n
        batch = {"input_ids": ids, "segment_ids": seg, "positions": pos}
        if bert:
            batch["token_type_ids"] = types
        if self.tagging:
            batch.update(labels=labels, loss_mask=mask)
        else:
            batch.update(cls_index=cls_index, labels=labels, label_mask=label_mask)
        return batch, examples
