"""Packing: segment ids, positions, targets and loss mask on hand-checkable streams (pure numpy, no datasets)."""

import numpy as np
import pytest

from jaxctx.data.errors import DataError
from jaxctx.data.packing import PackedLayout, StreamPacker, assemble_rows, check_seq_len

SEP, PAD = 2, 0


class _Store:
    """A TokenStore stand-in over a list of arrays (same interface PackedLayout uses)."""

    def __init__(self, docs):
        self.docs = [np.asarray(d, np.int32) for d in docs]
        self.lengths = np.array([len(d) for d in docs], np.int64)

    def gather(self, doc, offset):
        return np.array([self.docs[d][o] for d, o in zip(doc, offset)], np.int32)


def _rows(layout, rows, causal=True):
    return assemble_rows(*layout.windows(np.asarray(rows)), pad_id=PAD, causal=causal)


def test_segment_ids_positions_and_targets():
    # Stream: 10 11 12 S | 20 21 S | 30 31 32 33 34 S  (S = separator), T = 4
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    layout = PackedLayout(_Store(docs), np.arange(3), seq_len=4, separator=SEP)
    assert layout.total == 13 and layout.num_rows == 4
    b = _rows(layout, [0, 1, 2, 3])
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, SEP], [20, 21, SEP, 30],
                                                   [31, 32, 33, 34], [SEP, PAD, PAD, PAD]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1], [1, 0, 0, 0]])
    # positions restart per document, and a document continued from the previous row restarts at 0
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]])
    # targets are shifted; the last column looks into the next row
    np.testing.assert_array_equal(b["targets"], [[11, 12, SEP, 20], [21, SEP, 30, 31],
                                                 [32, 33, 34, SEP], [PAD, PAD, PAD, PAD]])
    # never scored across a document boundary (the separator does not predict the next document) or into padding
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    for key in ("input_ids", "targets", "segment_ids", "positions"):
        assert b[key].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32


def test_document_longer_than_seq_len_continues_in_next_rows():
    docs = [list(range(100, 111))]  # 11 tokens + separator, T = 4 -> 3 full rows
    layout = PackedLayout(_Store(docs), np.arange(1), seq_len=4, separator=SEP)
    b = _rows(layout, [0, 1, 2])
    np.testing.assert_array_equal(b["input_ids"].ravel(), list(range(100, 111)) + [SEP])
    assert (b["segment_ids"] == 1).all()
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3]] * 3)
    assert b["loss_mask"].sum() == 11  # every token but the final separator predicts its successor


def test_mlm_rows_have_unshifted_targets():
    layout = PackedLayout(_Store([[10, 11], [20]]), np.arange(2), seq_len=4, separator=SEP)
    b = _rows(layout, [0, 1], causal=False)
    np.testing.assert_array_equal(b["targets"], b["input_ids"])
    assert b["loss_mask"].sum() == 0  # MLM decides what is scored
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2], [1, 0, 0, 0]])  # ids restart per row


def test_stream_packer_matches_packed_layout():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 50, rng.integers(1, 30)) for _ in range(40)]
    layout = PackedLayout(_Store(docs), np.arange(len(docs)), seq_len=8, separator=SEP)
    expected = _rows(layout, np.arange(layout.num_rows))
    packer = StreamPacker(iter(docs), seq_len=8, separator=SEP)
    got = assemble_rows(*packer.windows(layout.num_rows), pad_id=PAD, causal=True)
    assert packer.exhausted
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # skip() lands on the same row as building the rows would
    skipper = StreamPacker(iter(docs), seq_len=8, separator=SEP)
    skipper.skip(5)
    row5 = assemble_rows(*skipper.windows(1), pad_id=PAD, causal=True)
    np.testing.assert_array_equal(row5["input_ids"][0], expected["input_ids"][5])


def test_aligned_documents_each_start_a_row_and_are_never_split():
    """align=True: every document starts a row, the tail of its last row is padding (unscored, segment 0), a
    document of up to T - 1 tokens sits whole in one row, and the row count does not depend on the order."""
    # T = 4: 10 11 12 S | 20 S _ _ | 30 31 32 33 | 34 S _ _
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34]]
    layout = PackedLayout(_Store(docs), np.arange(3), seq_len=4, separator=SEP, align=True)
    assert layout.num_rows == 4
    b = _rows(layout, [0, 1, 2, 3])
    np.testing.assert_array_equal(b["input_ids"], [[10, 11, 12, SEP], [20, SEP, PAD, PAD],
                                                   [30, 31, 32, 33], [34, SEP, PAD, PAD]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3], [0, 1, 0, 0], [0, 1, 2, 3], [0, 1, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])

    rng = np.random.default_rng(1)
    docs = [rng.integers(10, 50, rng.integers(1, 30)) for _ in range(60)]
    store = _Store(docs)
    counts = {PackedLayout(store, rng.permutation(60), seq_len=8, separator=SEP, align=True).num_rows
              for _ in range(3)}
    assert counts == {sum(-(-(len(d) + 1) // 8) for d in docs)}
    order = rng.permutation(60)
    layout = PackedLayout(store, order, seq_len=8, separator=SEP, align=True)
    b = _rows(layout, np.arange(layout.num_rows))
    short = {tuple(d) for d in docs if len(d) <= 7}
    whole = {tuple(ids[seg == 1][:-1]) for ids, seg in zip(b["input_ids"], b["segment_ids"])}
    assert short <= whole  # each short document is segment 1 of some row, separator included
    # every token comes through, in order: the valid tokens of the rows are the documents and separators
    stream = b["input_ids"][b["segment_ids"] > 0]
    np.testing.assert_array_equal(stream, np.concatenate([np.append(docs[i], SEP) for i in order]))
    # the streaming packer builds the same rows
    packer = StreamPacker(iter([docs[i] for i in order]), seq_len=8, separator=SEP, align=True)
    got = assemble_rows(*packer.windows(layout.num_rows), pad_id=PAD, causal=True)
    assert packer.exhausted
    for key in b:
        np.testing.assert_array_equal(got[key], b[key], err_msg=key)


@pytest.mark.parametrize("bad", [1, 0, -3])
def test_seq_len_below_two_is_rejected(bad):
    with pytest.raises(DataError, match="seq_len"):
        check_seq_len(bad)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLayout(_Store([[1]]), np.arange(1), seq_len=bad, separator=SEP)
