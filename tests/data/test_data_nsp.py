"""NSP pair builder: layout, token types, labels' balance, IsNext/NotNext sources, determinism."""

import numpy as np
import pytest

from jaxctx.data.errors import DataError
from jaxctx.data.nsp import IS_NEXT, NOT_NEXT, build_pair

CLS, SEP = 1, 2
# Each document's tokens are unique to it (doc d holds 1000*(d+1) + position), so a token names its source.
DOCS = [np.arange(1000 * (d + 1), 1000 * (d + 1) + 40 + 7 * d) for d in range(6)]


def _parts(row):
    n = int(row["attention_mask"].sum())
    ids = row["input_ids"][:n]
    seps = np.flatnonzero(ids == SEP)
    return ids, seps, ids[1:seps[0]], ids[seps[0] + 1:seps[1]]


def test_layout_and_token_types():
    row = build_pair(DOCS, 2, np.random.default_rng(0), seq_len=32, cls_id=CLS, sep_id=SEP)
    ids, seps, a, b = _parts(row)
    assert ids[0] == CLS and len(seps) == 2 and seps[1] == len(ids) - 1
    assert len(a) >= 1 and len(b) >= 1 and len(ids) <= 32
    assert (row["token_type_ids"][:seps[0] + 1] == 0).all()  # [CLS] A [SEP]
    assert (row["token_type_ids"][seps[0] + 1:len(ids)] == 1).all()  # B [SEP]
    assert (row["token_type_ids"][len(ids):] == 0).all() and (row["input_ids"][len(ids):] == 0).all()


def test_labels_balanced_and_sources_right():
    rng = np.random.default_rng(1)
    labels = []
    for i in range(2000):
        doc = i % len(DOCS)
        row = build_pair(DOCS, doc, rng, seq_len=24, cls_id=CLS, sep_id=SEP)
        _, _, a, b = _parts(row)
        assert (a // 1000 == doc + 1).all()  # A is consecutive text of its document
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        label = int(row["next_sentence_label"])
        if label == IS_NEXT:
            assert b[0] == a[-1] + 1  # B continues A in the same document
        else:
            assert label == NOT_NEXT and (b // 1000 != doc + 1).all()  # B from another document
        labels.append(label)
    assert abs(np.mean(labels) - 0.5) < 0.05


def test_deterministic_in_seed():
    rows = [[build_pair(DOCS, i % 6, rng, seq_len=20, cls_id=CLS, sep_id=SEP) for i in range(20)]
            for rng in (np.random.default_rng(7), np.random.default_rng(7))]
    for r1, r2 in zip(*rows):
        for key in r1:
            np.testing.assert_array_equal(r1[key], r2[key])


def test_too_short_row_is_a_clear_error():
    with pytest.raises(DataError, match="data.seq_len=4"):
        build_pair(DOCS, 0, np.random.default_rng(0), seq_len=4, cls_id=CLS, sep_id=SEP)
