"""BERT next-sentence-prediction pairs (Devlin et al. 2019, "BERT", section 3.1, task #2).

One pair per row: `[CLS] A [SEP] B [SEP]`, padded to the row length. A is consecutive text from one document; B
is either A's continuation in that same document (label 0 = IsNext, Hugging Face's convention) or a span of a
different, randomly chosen document (label 1 = NotNext), each with probability 1/2. Token types are 0 for
`[CLS] A [SEP]` and 1 for `B [SEP]`. Every choice comes from the numpy Generator passed in, so a pipeline that
seeds it from (seed, process, batch number) rebuilds the same pairs after a resume.

One pair per row (not several packed pairs) because the NSP head reads the single [CLS] position of each row,
as BertForPreTraining's pooler does.
"""

from __future__ import annotations

import numpy as np

from jaxctx.data.errors import DataError

IS_NEXT = 0  # B continues A (HF BertForPreTraining next_sentence_label convention)
NOT_NEXT = 1  # B comes from another document
SPECIAL_TOKENS_PER_PAIR = 3  # [CLS], [SEP] after A, [SEP] after B


def build_pair(documents: list[np.ndarray], doc_index: int, rng: np.random.Generator, *, seq_len: int,
               cls_id: int, sep_id: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One NSP row from `documents[doc_index]` (token ids without special tokens).

    Returns `input_ids` [T], `token_type_ids` [T], `attention_mask` [T] (1 on the pair, 0 on padding) and
    `next_sentence_label` (scalar int32: 0 IsNext, 1 NotNext), with T = seq_len.
    """
    budget = seq_len - SPECIAL_TOKENS_PER_PAIR  # tokens A and B share
    if budget < 2:
        raise DataError(f"data.seq_len={seq_len} is too short for a sentence pair; NSP needs at least "
                        f"{SPECIAL_TOKENS_PER_PAIR + 2} tokens ([CLS] A [SEP] B [SEP])")
    if len(documents) < 2:
        raise DataError(f"next-sentence prediction needs at least 2 documents (NotNext draws B from another "
                        f"document), got {len(documents)}")
    doc = np.asarray(documents[doc_index])
    if len(doc) < 2:
        raise DataError(f"document {doc_index} has {len(doc)} tokens; an IsNext pair needs at least 2")
    # A span of up to `budget` tokens of the document, split at a random point into A | continuation.
    span_len = min(budget, len(doc))
    start = int(rng.integers(0, len(doc) - span_len + 1))
    split = int(rng.integers(1, span_len))  # A = span[:split], never empty; continuation never empty
    tokens_a = doc[start:start + split]
    if rng.random() < 0.5:
        label, tokens_b = IS_NEXT, doc[start + split:start + span_len]
    else:
        other = int(rng.integers(0, len(documents) - 1))
        other += other >= doc_index  # any document but this one
        other_doc = np.asarray(documents[other])
        b_len = min(budget - split, len(other_doc))
        b_start = int(rng.integers(0, len(other_doc) - b_len + 1))
        label, tokens_b = NOT_NEXT, other_doc[b_start:b_start + b_len]
    pair = np.concatenate([[cls_id], tokens_a, [sep_id], tokens_b, [sep_id]]).astype(np.int32)
    type_b_start = len(tokens_a) + 2  # [CLS] A [SEP] have type 0
    input_ids = np.full(seq_len, pad_id, np.int32)
    input_ids[:len(pair)] = pair
    token_type_ids = np.zeros(seq_len, np.int32)
    token_type_ids[type_b_start:len(pair)] = 1
    attention_mask = np.zeros(seq_len, np.int32)
    attention_mask[:len(pair)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "next_sentence_label": np.int32(label)}


class _StoreDocuments:
    """A TokenStore (jaxctx.data.packing) seen as a sequence of documents, for build_pair."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return self.store.num_documents

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.store.document(doc)


def pair_batch(store, rng: np.random.Generator, *, rows: int, seq_len: int, cls_id: int, sep_id: int,
               pad_id: int) -> dict[str, np.ndarray]:
    """A batch of `rows` NSP rows, each from a document drawn uniformly (with replacement) among those with at
    least 2 tokens. Keys as the packed BERT batch (input_ids, segment_ids, positions, targets, loss_mask; MLM
    masking fills targets/loss_mask afterwards) plus token_type_ids [R, T] and next_sentence_label [R, T] (constant per row)."""
    eligible = np.flatnonzero(store.lengths >= 2)
    if len(eligible) == 0:
        raise DataError("data.nsp=true needs documents of at least 2 tokens; every document is shorter")
    documents = _StoreDocuments(store)
    pairs = [build_pair(documents, int(eligible[i]), rng, seq_len=seq_len, cls_id=cls_id, sep_id=sep_id,
                        pad_id=pad_id) for i in rng.integers(0, len(eligible), rows)]
    stacked = {key: np.stack([p[key] for p in pairs]) for key in pairs[0]}
    mask = stacked.pop("attention_mask")  # [R, T] 1 on the pair
    positions = np.where(mask > 0, np.arange(seq_len)[None], 0).astype(np.int32)
    return {"input_ids": stacked["input_ids"], "segment_ids": mask.astype(np.int32), "positions": positions,
            "targets": stacked["input_ids"].copy(), "loss_mask": np.zeros(mask.shape, np.float32),
            "token_type_ids": stacked["token_type_ids"],
            # [R, T]: the row's label at every position, so it shards and splits like every other batch array
            "next_sentence_label": np.repeat(stacked["next_sentence_label"][:, None], seq_len, axis=1)}
