"""The iterator end to end on small corpora: exact resume, determinism, host sharding, coverage, global batch."""

import json

import numpy as np
import pytest

from jaxctx.data.pipeline import build_iterator
from jaxctx.data.tokenizer import ByteTokenizer

SEQ = 32


def _decode_stream(batches, sep):
    """Concatenate the real tokens of unshuffled batches and split at separators -> document texts."""
    tok = ByteTokenizer()
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    cuts = np.flatnonzero(ids == sep)
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(ids[start:c]))
        start = c + 1
    assert start == len(ids), "the stream must end with a separator"
    return docs


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_exact_resume(make_cfg, corpus, dh, streaming, family):
    """Take N, save state, take M; restore (from JSON) and take M again: identical, across an epoch boundary."""
    cfg = make_cfg(family=family, source=corpus(), seq_len=SEQ, streaming=streaming, shuffle_buffer=8)
    it = build_iterator(cfg, process_index=0, process_count=1)
    n = 10 if streaming else it.rows_per_epoch // 4 - 2  # map-style: the next M batches cross into epoch 1
    dh.take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # the state must survive JSON (the checkpoint format)
    after = dh.take(it, 6)
    restored = build_iterator(cfg, process_index=0, process_count=1, state=state)
    dh.assert_batches_equal(after, dh.take(restored, 6))
    sought = build_iterator(cfg, process_index=0, process_count=1)
    sought.seek(n)  # the position is derivable from the global step alone
    dh.assert_batches_equal(after, dh.take(sought, 6))


def test_same_seed_same_batches_other_seed_differs(make_cfg, corpus, dh):
    source = corpus()
    a = dh.take(build_iterator(make_cfg(source=source, seq_len=SEQ), process_index=0, process_count=1), 3)
    b = dh.take(build_iterator(make_cfg(source=source, seq_len=SEQ), process_index=0, process_count=1), 3)
    dh.assert_batches_equal(a, b)
    c = dh.take(build_iterator(make_cfg(source=source, seq_len=SEQ, seed=1), process_index=0, process_count=1), 3)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_batch_contract(make_cfg, corpus):
    cfg = make_cfg(source=corpus(), seq_len=SEQ, batch_size=4)
    batch = next(build_iterator(cfg, process_index=0, process_count=1))
    assert set(batch) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
    for key, value in batch.items():
        assert value.shape == (4, SEQ), key
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key
    bert = next(build_iterator(make_cfg(family="bert", source=corpus(), seq_len=SEQ), process_index=0,
                               process_count=1))
    assert set(bert) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions", "token_type_ids"}
    assert (bert["token_type_ids"] == 0).all()


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_two_processes_read_disjoint_complete_shares(make_cfg, corpus, dh, streaming):
    texts = dh.random_texts(41)  # odd: the shares differ in size
    cfg = make_cfg(source=corpus(texts), seq_len=SEQ, shuffle=False, streaming=streaming, validation_fraction=0.1)
    sep = ByteTokenizer().special.eos
    single = _decode_stream(list(build_iterator(cfg, process_index=0, process_count=1, repeat=False)), sep)
    shares = []
    for p in range(2):
        it = build_iterator(cfg, process_index=p, process_count=2, repeat=False)
        batches = list(it)  # one pass; the last batch is padded, never dropped
        assert batches and all(b["input_ids"].shape == (2, SEQ) for b in batches)  # half the global batch
        shares.append(_decode_stream(batches, sep))
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(single)
    train_texts = {t for t in texts if t in set(single)}
    assert len(single) == len(train_texts) and 0 < len(single) < len(texts)  # the validation split is held out


def test_validation_split_is_disjoint_and_unshuffled(make_cfg, corpus, dh):
    texts = dh.random_texts(80)
    cfg = make_cfg(source=corpus(texts), seq_len=SEQ, validation_fraction=0.25)
    sep = ByteTokenizer().special.eos
    val = _decode_stream(list(build_iterator(cfg, "validation", process_index=0, process_count=1, repeat=False)),
                         sep)
    train = _decode_stream(list(build_iterator(make_cfg(source=cfg.data.source, seq_len=SEQ, shuffle=False,
                                                        validation_fraction=0.25),
                                               process_index=0, process_count=1, repeat=False)), sep)
    assert val and train and set(val).isdisjoint(train)
    assert sorted(val + train) == sorted(texts)
    assert val == [t for t in texts if t in set(val)]  # file order: a fixed evaluation set


def test_shuffled_epoch_has_the_same_tokens(make_cfg, corpus):
    source = corpus()
    counts = []
    for shuffle in (False, True):
        it = build_iterator(make_cfg(source=source, seq_len=SEQ, shuffle=shuffle), process_index=0,
                            process_count=1, repeat=False)
        ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in it])
        counts.append(np.bincount(ids, minlength=263))
    np.testing.assert_array_equal(counts[0], counts[1])


def test_stdlib_subset_pads_under_five_percent(make_cfg):
    cfg = make_cfg(source="stdlib", seq_len=256, batch_size=8, max_documents=40)
    it = build_iterator(cfg, process_index=0, process_count=1)
    batches = [next(it) for _ in range(20)]
    stats = it.stats()
    assert stats["padding_fraction"] < 0.05 and stats["tokens_per_sec"] > 0
    assert stats["documents"] <= 40 and stats["invalid_utf8_bytes"] == 0
    text = ByteTokenizer().decode(batches[0]["input_ids"][0])
    assert text.isprintable() or "\n" in text  # decodes to Python source


def test_process_count_change_warns(make_cfg, corpus, dh):
    cfg = make_cfg(source=corpus(), seq_len=SEQ)
    it = build_iterator(cfg, process_index=0, process_count=1)
    dh.take(it, 2)
    state = it.get_state()
    with pytest.warns(UserWarning, match="re-shard"):
        build_iterator(cfg, process_index=0, process_count=2, state=state)
    with pytest.raises(ValueError, match="seq_len"):
        build_iterator(make_cfg(source=cfg.data.source, seq_len=16), process_index=0, process_count=1,
                       state=state)


def test_make_global_batch(make_cfg, corpus):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxctx.data.global_batch import make_global_batch

    n = jax.device_count()
    cfg = make_cfg(source=corpus(), seq_len=SEQ, batch_size=n)
    local = next(build_iterator(cfg, process_index=0, process_count=1))
    mesh = jax.make_mesh((n,), ("data",))
    arrays = make_global_batch(local, NamedSharding(mesh, P("data")))
    for key, value in local.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
        assert len(arrays[key].sharding.device_set) == n
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)
