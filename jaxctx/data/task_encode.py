"""Encoding labelled examples into token ids with their labels (the `datasets.map` functions of jaxctx.data.task).

Classification (`text` [+ `text_pair`] + `label`), with the special tokens the head expects:

    bert        [CLS] text [SEP] (text_pair [SEP])     token types 0 ... (1 ...); the head reads [CLS] (offset 0)
    gpt2/llama  text (SEP text_pair) EOS               the head reads the final EOS (offset len-1), which has
                                                       seen the whole example under causal attention

Tagging (`tokens` = words + `tags`, one tag per word), labels aligned to sub-words as transformers' run_ner
example does: the first sub-token of each word carries the word's tag, later sub-tokens and special tokens get
IGNORE (not scored, `loss_mask` 0).

    Hugging Face tokenizer   `tokenizer(words, is_split_into_words=True)` and its `word_ids()` (a fast tokenizer)
    byte tokenizer           each word's UTF-8 bytes, words joined by one space byte (unlabelled); the word's
                             first byte carries its tag
    bert adds [CLS] ... [SEP] around the words (unlabelled); gpt2/llama add nothing.

An example longer than data.seq_len is truncated to fit (pairs longest-first, the special tokens kept) and
counted (`truncated`). Bad examples raise DataError naming the example index and the column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxctx.data.errors import DataError

IGNORE = -100  # tag id of a token that is not scored (as HF's ignore_index)
SPACE_BYTE = ord(" ")


@dataclass(frozen=True)
class Specials:
    """The special-token layout of one model family (see the module docstring)."""

    causal: bool
    cls: int | None
    sep: int
    eos: int

    @classmethod
    def of(cls, tokenizer, causal: bool) -> "Specials":
        sp = tokenizer.special
        if not causal and sp.cls is None:
            raise DataError(f"tokenizer {tokenizer.name!r} has no [CLS] token, which bert's sequence head reads; "
                            f"use a tokenizer with one (e.g. data.tokenizer=byte)")
        return cls(causal=causal, cls=sp.cls, sep=sp.separator(False), eos=sp.separator(True))


def fit_pair(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths (a, b) kept when a pair of la + lb tokens must fit `budget`: the longer one is cut first."""
    if la + lb <= budget:
        return la, lb
    nb = min(lb, max(budget - la, budget // 2))
    return min(la, budget - nb), nb


def encode_classification(batch: dict, indices: list[int], *, tokenizer, specials: Specials, seq_len: int,
                          text_field: str, pair_field: str | None, label_field: str, problem: str,
                          label2id: dict | None, num_labels: int, description: str) -> dict:
    """datasets.map (batched, with_indices): texts + labels -> input_ids, token_type_ids, label, cls_offset."""
    a_ids = tokenizer.encode_batch(_strings(batch[text_field], indices, text_field, description))
    b_ids = (tokenizer.encode_batch(_strings(batch[pair_field], indices, pair_field, description))
             if pair_field else [None] * len(a_ids))
    out = {"input_ids": [], "token_type_ids": [], "label": [], "cls_offset": [], "truncated": []}
    for index, a, b, label in zip(indices, a_ids, b_ids, batch[label_field]):
        n_special = (1 if specials.causal else 2) + (b is not None)
        budget = seq_len - n_special
        if budget < 1:
            raise DataError(f"data.seq_len={seq_len} leaves no room for text besides {n_special} special tokens")
        la, lb = fit_pair(len(a), 0 if b is None else len(b), budget)
        out["truncated"].append(la < len(a) or (b is not None and lb < len(b)))
        a = a[:la]
        if specials.causal:
            parts = [a] + ([[specials.sep], b[:lb]] if b is not None else []) + [[specials.eos]]
            types = [np.zeros(sum(len(p) for p in parts), np.int8)]
        else:
            parts = [[specials.cls], a, [specials.sep]] + ([b[:lb], [specials.sep]] if b is not None else [])
            types = [np.zeros(la + 2, np.int8)] + ([np.ones(lb + 1, np.int8)] if b is not None else [])
        ids = np.concatenate([np.asarray(p, np.int32) for p in parts])
        out["input_ids"].append(ids)
        out["token_type_ids"].append(np.concatenate(types))
        out["cls_offset"].append(len(ids) - 1 if specials.causal else 0)
        out["label"].append(_label_value(label, index, label_field, problem, label2id, num_labels, description))
    return out


def _strings(values, indices, field, description):
    for index, value in zip(indices, values):
        if not isinstance(value, str):
            raise DataError(f"example {index} of {description}, column {field!r}: {type(value).__name__} "
                            f"{str(value)[:40]!r} is not a string")
    return values


def _label_value(label, index: int, field: str, problem: str, label2id: dict | None, num_labels: int,
                 description: str):
    """One example's label as the batch holds it: class id, multi-hot list or float."""
    where = f"example {index} of {description}, column {field!r}"
    if problem == "regression":
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataError(f"{where}: regression needs a number, got {label!r}")
        return float(label)
    items = label if problem == "multi_label" else [label]
    if problem == "multi_label" and not isinstance(label, (list, tuple)):
        raise DataError(f"{where}: model.problem_type=multi_label needs a list of labels, got {label!r}")
    ids = [_label_id(item, where, label2id, num_labels) for item in items]
    if problem == "multi_label":
        hot = [0.0] * num_labels
        for i in ids:
            hot[i] = 1.0
        return hot
    return ids[0]


def _label_id(value, where: str, label2id: dict | None, num_labels: int) -> int:
    if isinstance(value, str) and label2id is not None and value in label2id:
        return label2id[value]
    if isinstance(value, int) and not isinstance(value, bool) and label2id is None and 0 <= value < num_labels:
        return value
    known = ", ".join(label2id) if label2id is not None else f"ids 0..{num_labels - 1}"
    raise DataError(f"{where}: label {value!r} is not in the label set ({known})")


def encode_tagging(batch: dict, indices: list[int], *, tokenizer, specials: Specials, seq_len: int,
                   tokens_field: str, tags_field: str, label2id: dict | None, num_labels: int,
                   description: str) -> dict:
    """datasets.map (batched, with_indices): words + tags -> input_ids, tag_ids (IGNORE where not scored)."""
    words_batch, tags_batch = batch[tokens_field], batch[tags_field]
    tag_ids = []
    for index, words, tags in zip(indices, words_batch, tags_batch):
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise DataError(f"example {index} of {description}, column {tokens_field!r}: needs a list of word "
                            f"strings, got {str(words)[:60]}")
        if not isinstance(tags, (list, tuple)):
            raise DataError(f"example {index} of {description}, column {tags_field!r}: needs a list of tags, got "
                            f"{str(tags)[:60]}")
        if len(words) != len(tags):
            raise DataError(f"example {index} of {description}: column {tokens_field!r} has {len(words)} words but "
                            f"column {tags_field!r} has {len(tags)} tags; give one tag per word")
        where = f"example {index} of {description}, column {tags_field!r}"
        tag_ids.append([_label_id(t, where, label2id, num_labels) for t in tags])
    pieces = _word_pieces(tokenizer, words_batch)
    budget = seq_len - (0 if specials.causal else 2)
    if budget < 1:
        raise DataError(f"data.seq_len={seq_len} leaves no room for words besides [CLS] and [SEP]")
    out = {"input_ids": [], "tag_ids": [], "truncated": []}
    for (ids, word_of), tags in zip(pieces, tag_ids):
        # first sub-token of each word: its word differs from the previous token's
        first = np.ones(len(ids), bool)
        first[1:] = word_of[1:] != word_of[:-1]
        first &= word_of >= 0
        labels = np.where(first, np.asarray(tags, np.int32)[np.maximum(word_of, 0)] if tags else IGNORE, IGNORE)
        out["truncated"].append(len(ids) > budget)
        ids, labels = ids[:budget], labels[:budget]
        if not specials.causal:
            ids = np.concatenate([[specials.cls], ids, [specials.sep]]).astype(np.int32)
            labels = np.concatenate([[IGNORE], labels, [IGNORE]])
        out["input_ids"].append(ids.astype(np.int32))
        out["tag_ids"].append(labels.astype(np.int32))
    return out


def _word_pieces(tokenizer, words_batch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example (token ids [L], word index of each token [L], -1 = no word), without special tokens."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:  # the byte tokenizer: bytes of each word, one unlabelled space between words
        out = []
        for words in words_batch:
            ids, word_of = [], []
            for w, word in enumerate(words):
                if w:
                    ids.append(SPACE_BYTE + tokenizer.offset)
                    word_of.append(-1)
                data = word.encode("utf-8")
                ids.extend(b + tokenizer.offset for b in data)
                word_of.extend([w] * len(data))
            out.append((np.asarray(ids, np.int32), np.asarray(word_of, np.int64)))
        return out
    if not getattr(hf, "is_fast", False):
        raise DataError(f"tagging aligns tags with word_ids(), which needs a fast tokenizer; {tokenizer.name!r} "
                        f"is a slow one (save it with a tokenizer.json, e.g. `jaxctx tokenizer train`)")
    try:
        enc = hf([list(w) for w in words_batch], is_split_into_words=True, add_special_tokens=False,
                 return_attention_mask=False, verbose=False)
    except (ValueError, TypeError, AssertionError) as err:  # e.g. GPT-2's tokenizer without add_prefix_space
        detail = " ".join(str(err).split())[:200]
        raise DataError(f"tokenizer {tokenizer.name!r} cannot tokenize pre-split words ({detail}); GPT-2/RoBERTa "
                        f"style tokenizers need add_prefix_space=True saved in their tokenizer_config.json") from None
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        word_of = np.asarray([-1 if w is None else w for w in enc.word_ids(i)], np.int64)
        out.append((np.asarray(ids, np.int32), word_of))
    return out
