"""Synthetic passkey documents (jaxctx.data.passkey_docs) and their mixing into the pipeline (data.passkey_fraction)."""

import re

import numpy as np
import pytest

from jaxctx.data import build_iterator
from jaxctx.data.errors import DataError
from jaxctx.data.passkey_docs import answer, passkey_documents, shortest_document
from jaxctx.data.tokenizer import ByteTokenizer
from jaxctx.evaluate import passkey

TOK = ByteTokenizer()


def encode(text):
    return TOK.encode_batch([text])[0]


def test_documents_hold_the_needle_and_the_answer_after_the_question():
    docs = passkey_documents(encode, max_length=600, num_tokens=60_000, seed=3)
    assert sum(map(len, docs)) >= 60_000 and len(docs) > 100
    filler, depths = len(encode(passkey.FILLER)), []
    for ids in docs:
        text = TOK.decode(ids)
        key = text[-6:-1]
        assert text.endswith(passkey.QUESTION + answer(key)) and key.isdigit()
        assert text.count(passkey.needle(key)) == 1 and text.count(key) == 3  # needle twice, answer once
        assert shortest_document(encode) - 5 <= len(ids) <= 600
        # the needle sits after a whole number of filler sentences: relative depth = sentences before / all
        before = text.index(passkey.needle(key))
        assert before % filler == 0
        sentences = (len(ids) - len(encode(passkey.needle(key) + passkey.QUESTION + answer(key)))) // filler
        depths.append(before // filler / max(sentences, 1))
    depths = np.array(depths)
    assert depths.min() == 0.0 and depths.max() == 1.0 and 0.4 < depths.mean() < 0.6  # uniform depths
    lengths = np.array([len(d) for d in docs])
    assert lengths.min() < 250 and lengths.max() > 550  # lengths span shortest .. max_length


def test_documents_are_deterministic_and_keys_disjoint_from_eval():
    def make(**kw):
        return [d.tolist() for d in passkey_documents(encode, max_length=400, num_tokens=20_000, **kw)]

    assert make(seed=0) == make(seed=0)
    assert make(seed=0) != make(seed=1) and make(seed=0) != make(seed=0, split="validation")
    train_keys = {TOK.decode(d)[-6:-1] for d in passkey_documents(encode, max_length=300, num_tokens=300_000, seed=0)}
    eval_keys = {p.key for p in passkey.make_prompts(encode, [300], [0.0, 0.5, 1.0], trials=100, seed=0)}
    assert len(train_keys) > 1000 and len(eval_keys) > 250
    assert not any(map(passkey.is_eval_key, train_keys)) and all(map(passkey.is_eval_key, eval_keys))
    assert not train_keys & eval_keys


def test_longer_training_keys_vary_in_length_and_stay_out_of_the_eval_half():
    """passkey_max_digits: keys of 5..N digits (uniform), no leading zero, three copies per document; the default
    (5) draws the same stream as before the option existed."""
    docs = passkey_documents(encode, max_length=500, num_tokens=80_000, seed=2, max_digits=12)
    keys = []
    for ids in docs:
        text = TOK.decode(ids)
        key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text).group(1)
        assert text.endswith(passkey.QUESTION + answer(key)) and key[0] != "0" and text.count(key) == 3
        assert shortest_document(encode) - 5 <= len(ids) <= 500
        keys.append(key)
    assert sorted({len(k) for k in keys}) == list(range(5, 13))
    assert not any(map(passkey.is_eval_key, keys))
    assert ([d.tolist() for d in passkey_documents(encode, max_length=400, num_tokens=5_000, seed=0)]
            == [d.tolist() for d in passkey_documents(encode, max_length=400, num_tokens=5_000, seed=0, max_digits=5)])


def test_min_length_keeps_documents_long_and_is_checked():
    """passkey_min_length: documents of min_length..max_length tokens (whole filler sentences, so up to one
    sentence shorter), which puts keys at distances up to the whole row; above max_length is an error."""
    docs = passkey_documents(encode, max_length=1023, num_tokens=100_000, seed=0, min_length=1000)
    lengths = np.array([len(d) for d in docs])
    assert lengths.min() >= 1000 - len(encode(passkey.FILLER)) and lengths.max() <= 1023
    distances = [len(d) - TOK.decode(d).index(passkey.needle(TOK.decode(d)[-6:-1])) for d in docs]
    assert min(distances) < 150 and max(distances) > 900  # needle to end: from the needle + question to the row
    with pytest.raises(DataError, match="passkey_min_length=600"):
        passkey_documents(encode, max_length=511, num_tokens=1000, seed=0, min_length=600)


def test_full_length_fraction_makes_long_distances_common():
    """passkey_full_length_fraction: that share of documents fills the row (whole filler sentences, so up to one
    sentence short), the rest keep uniform lengths; keys far back, rare with uniform lengths, become common."""
    filler = len(encode(passkey.FILLER))

    def stats(fraction):
        docs = passkey_documents(encode, max_length=2047, num_tokens=600_000, seed=0, min_length=500,
                                 full_length_fraction=fraction)
        lengths = np.array([len(d) for d in docs])
        distances = np.array([len(d) - TOK.decode(d).index(passkey.needle(TOK.decode(d)[-6:-1])) for d in docs])
        return (lengths > 2047 - filler).mean(), (distances > 1500).mean(), lengths.min()

    full_none, far_none, _ = stats(0.0)
    full_half, far_half, shortest_half = stats(0.5)
    assert full_none < 0.05 and 0.4 < full_half < 0.65  # ~0.5 + the uniform draws' own near-full share
    assert far_half > 3 * far_none  # P(d > 1500): ~0.03 with uniform lengths, ~0.16 with half of them full rows
    assert shortest_half < 600  # the short documents stay
    assert stats(1.0)[0] == 1.0  # every document a full row


def test_aligned_pipeline_rows_hold_whole_passkey_documents(make_cfg, corpus):
    """data.align_documents + passkey_min_length: every passkey document sits whole in its own row (needle,
    question and answer), so no row asks for a key it cannot see."""
    settings = dict(source=corpus(n=50), seq_len=512, passkey_fraction=0.8, passkey_min_length=480,
                    align_documents=True, validation_fraction=0.0)
    it = build_iterator(make_cfg(**settings), "train", process_index=0, process_count=1)
    found = 0
    for _ in range(6):
        b = next(it)
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            text = TOK.decode(ids[seg == 1])
            if passkey.QUESTION in text:
                key = text[-6:-1]  # "... is KEY." (the separator decodes to nothing)
                assert text.startswith(passkey.FILLER) and passkey.needle(key) in text, text[-80:]
                assert (seg == 2).sum() == 0  # nothing else shares the row
                found += 1
    assert found > 10
    # A resume with other packing, or other document lengths, is refused by name.
    for change in ({"align_documents": False}, {"passkey_full_length_fraction": 0.5}):
        other = build_iterator(make_cfg(**{**settings, **change}), "train", process_index=0, process_count=1)
        with pytest.raises(DataError, match=next(iter(change))):
            other.set_state(it.get_state())


def test_pipeline_mixes_the_stated_fraction_of_tokens(make_cfg, corpus):
    path = corpus(n=300)
    cfg = make_cfg(source=path, seq_len=256, passkey_fraction=0.4, validation_fraction=0.0)
    it = build_iterator(cfg, "train", process_index=0, process_count=1)
    source_docs = it._source.source_documents
    store = it._source.store
    pk_tokens = int(store.lengths[source_docs:].sum())
    assert abs(pk_tokens / store.num_tokens - 0.4) < 0.01
    # in the shuffled batches: tokens of passkey segments ~ the fraction. The corpus is lowercase (random_texts);
    # passkey text has a capital at least every sentence, so a segment with one is (a piece of) a passkey document.
    batches = [next(it) for _ in range(60)]
    total = pk = 0
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            for s in np.unique(seg[seg > 0]):
                n = int((seg == s).sum())
                total += n
                pk += n if re.search("[A-Z]", TOK.decode(ids[seg == s])) else 0
    assert abs(pk / total - 0.4) < 0.08, pk / total
    # resume: a fresh pipeline positioned after 5 batches yields batch 6 exactly
    again = build_iterator(cfg, "train", process_index=0, process_count=1)
    again.seek(5)
    resumed = next(again)
    assert all(np.array_equal(resumed[k], batches[5][k]) for k in batches[5])
