"""BERT MLM masking: proportions on a large sample, never special tokens or padding, labels only where chosen."""

import numpy as np

from jaxctx.data import mlm
from jaxctx.data.pipeline import build_iterator
from jaxctx.data.tokenizer import ByteTokenizer


def test_mlm_proportions_on_a_large_sample():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    shape = (256, 1024)  # 262k tokens: proportions to within ~0.5 percentage points
    original = rng.integers(tok.offset, tok.vocab_size, shape).astype(np.int32)
    seg = np.ones(shape, np.int32)
    seg[:, -100:] = 0  # padding
    original[:, 500] = tok.special.sep  # separators are special: never chosen
    batch = {"input_ids": original.copy(), "segment_ids": seg}
    mlm.mask_tokens(batch, np.random.default_rng(1), probability=0.15, mask_id=tok.special.mask,
                    special_ids=tok.special_ids, random_ids=mlm.random_token_ids(tok.vocab_size, tok.special_ids))
    chosen = batch["loss_mask"] > 0
    candidates = (seg > 0) & (original != tok.special.sep)
    assert not chosen[~candidates].any()
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.003
    inputs = batch["input_ids"][chosen]
    masked = inputs == tok.special.mask
    unchanged = inputs == original[chosen]
    randomised = ~masked & ~unchanged
    assert abs(masked.mean() - 0.8) < 0.01
    # a random draw equal to the original counts as unchanged: expected 0.1 * 1/256 extra
    assert abs(unchanged.mean() - 0.1) < 0.01 and abs(randomised.mean() - 0.1) < 0.01
    assert not np.isin(inputs[randomised], tok.special_ids).any()  # random tokens are ordinary tokens
    np.testing.assert_array_equal(batch["targets"], original)  # labels: the original token
    np.testing.assert_array_equal(batch["input_ids"][~chosen], original[~chosen])  # untouched elsewhere


def test_bert_pipeline_masks_and_packs(make_cfg, corpus):
    cfg = make_cfg(family="bert", source=corpus(n=120), seq_len=64, batch_size=8)
    it = build_iterator(cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(10)]
    tok = ByteTokenizer()
    chosen = np.concatenate([b["loss_mask"].ravel() for b in batches]) > 0
    real = np.concatenate([((b["segment_ids"] > 0) & (b["targets"] != tok.special.sep)).ravel() for b in batches])
    assert not chosen[~real].any()
    assert 0.10 < chosen.sum() / real.sum() < 0.20  # ~5k candidates: loose bounds
    for b in batches:
        assert b["segment_ids"].max() > 1 or (b["segment_ids"] > 0).all()  # packed several docs per row
        assert (b["input_ids"][b["loss_mask"] == 0] == b["targets"][b["loss_mask"] == 0]).all()
        assert (b["input_ids"] == tok.special.sep).sum() == (b["targets"] == tok.special.sep).sum()  # BERT: SEP


def test_bert_pipeline_with_aligned_documents_masks_only_document_tokens(make_cfg, corpus):
    """data.align_documents: every row holds one document (or a piece of one) and its last row's tail is padding
    (segment 0); MLM chooses only document tokens, at the usual rate, never the padding."""
    cfg = make_cfg(family="bert", source=corpus(n=120), seq_len=64, batch_size=8, align_documents=True)
    it = build_iterator(cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(10)]
    tok = ByteTokenizer()
    segments = np.concatenate([b["segment_ids"] for b in batches])  # [rows, T]
    chosen = np.concatenate([b["loss_mask"] for b in batches]) > 0
    real = (segments > 0) & (np.concatenate([b["targets"] for b in batches]) != tok.special.sep)
    assert (segments == 0).sum() > 100  # padded tails exist, so the next check means something
    assert not chosen[~real].any()
    assert 0.10 < chosen.sum() / real.sum() < 0.20
    assert all(len(set(row[row > 0].tolist())) == 1 for row in segments)  # one document per row
