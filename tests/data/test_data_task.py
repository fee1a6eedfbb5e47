"""Labelled data (jaxctx.data.task): sub-word tag alignment, packing of classification examples, resume, shards."""

import json
import os

import numpy as np
import pytest

from jaxctx.data.task import build_task_iterator
from jaxctx.data.task_encode import IGNORE, fit_pair

WORDS = "parse the configuration file quickly , then tokenize identifiers and multiprocessing queues".split()


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def task_cfg(hf_cache):
    from jaxctx.config import from_dict

    def make(source, task="sequence_classification", family="gpt2", num_labels=3, seq_len=64, batch_size=4,
             problem_type=None, **data):
        data_task = "classification" if task == "sequence_classification" else "tagging"
        return from_dict({"model": {"family": family, "vocab_size": 512, "task": task, "num_labels": num_labels,
                                    "problem_type": problem_type},
                          "data": {"source": source, "task": data_task, "seq_len": seq_len, "cache_dir": hf_cache,
                                   "num_proc": 1, **data},
                          "train": {"batch_size": batch_size}}).resolved()
    return make


def _tagging_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    tags = ["B-x", "I-x", "O"]
    rows = []
    for _ in range(n):
        words = list(rng.choice(WORDS, rng.integers(2, 9)))
        rows.append({"tokens": words, "tags": [tags[i] for i in rng.integers(0, 3, len(words))]})
    return rows


def _text(ids):
    """Byte-tokenizer ids (byte b = id b + 7) -> text."""
    return (np.asarray(ids) - 7).astype(np.uint8).tobytes().decode()


def _segments(batch, r):
    """[(segment id, slice)] of the examples in row r."""
    seg = batch["segment_ids"][r]
    return [(k, np.nonzero(seg == k)[0]) for k in range(1, seg.max() + 1)]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_tag_alignment_matches_hugging_face_run_ner(tmp_path, task_cfg, family):
    from jaxctx.data.bpe import train_bpe

    tok_dir = str(tmp_path / "bpe")
    hf = train_bpe([" ".join(WORDS)] * 30 + ["a b c d e f"] * 5, 280, tok_dir)
    rows = _tagging_rows(12)
    src = _write(str(tmp_path / "tags" / "train.jsonl"), rows)
    _write(str(tmp_path / "tags" / "validation.jsonl"), rows[:2])
    cfg = task_cfg(str(tmp_path / "tags"), task="token_classification", family=family, seq_len=128,
                   tokenizer=tok_dir, shuffle=False)
    it = build_task_iterator(cfg, "train", repeat=False)
    label2id = {name: i for i, name in enumerate(it.labels.names)}
    assert it.labels.names == ("B-x", "I-x", "O") and src
    seen = 0
    for batch in it:
        for r in range(batch["input_ids"].shape[0]):
            for k, pos in _segments(batch, r):
                row = rows[int(it.last_examples[r, k - 1])]
                # HF run_ner: tokenize the words, label the first token of each word_id, IGNORE the rest
                enc = hf(row["tokens"], is_split_into_words=True, add_special_tokens=False)
                want, previous = [], None
                for w in enc.word_ids():
                    want.append(IGNORE if w is None or w == previous else label2id[row["tags"][w]])
                    previous = w
                # independently: each word alone tokenizes to the same pieces, the first one carries the tag
                alone = [hf(w, add_special_tokens=False)["input_ids"] for w in row["tokens"]]
                assert sum(alone, []) == enc["input_ids"]
                assert [t for ids, tag in zip(alone, row["tags"]) for t in [label2id[tag]] + [IGNORE] *
                        (len(ids) - 1)] == want
                ids, labels, mask = (batch["input_ids"][r, pos], batch["labels"][r, pos], batch["loss_mask"][r, pos])
                got = np.where(mask > 0, labels, IGNORE).tolist()
                if family == "bert":  # [CLS] words [SEP], specials unscored
                    assert ids[0] == hf.convert_tokens_to_ids("<cls>") and ids[-1] == hf.convert_tokens_to_ids(
                        "<sep>")
                    ids, got = ids[1:-1], got[1:-1]
                    assert batch["token_type_ids"][r, pos].sum() == 0
                assert ids.tolist() == enc["input_ids"] and got == want
                assert batch["positions"][r, pos].tolist() == list(range(len(pos)))
                seen += 1
    assert seen == len(rows) and any(len(hf(w)["input_ids"]) > 1 for w in WORDS)  # some words are split


def test_byte_tokenizer_tags_each_words_first_byte(tmp_path, task_cfg):
    rows = [{"tokens": ["déf", "x1", "=="], "tags": ["O", "B-x", "I-x"]}]
    _write(str(tmp_path / "d" / "train.jsonl"), rows)
    _write(str(tmp_path / "d" / "validation.jsonl"), rows)
    it = build_task_iterator(task_cfg(str(tmp_path / "d"), task="token_classification"), "train", repeat=False)
    batch = next(it)
    n = int((batch["segment_ids"][0] == 1).sum())
    assert _text(batch["input_ids"][0, :n]) == "déf x1 =="  # words joined by one space byte
    scored = np.nonzero(batch["loss_mask"][0])[0].tolist()
    assert scored == [0, 5, 8]  # 'd' of déf (é is 2 bytes), 'x', the first '='
    assert batch["labels"][0, scored].tolist() == [2, 0, 1]  # O, B-x, I-x (sorted label set)


def test_classification_packing_cls_index_segments_and_slots(tmp_path, task_cfg):
    rng = np.random.default_rng(1)
    rows = [{"text": "x" * int(rng.integers(1, 40)), "label": f"c{i % 3}"} for i in range(40)]
    rows.append({"text": "y" * 200, "label": "c0"})  # longer than seq_len: truncated, alone in its row
    _write(str(tmp_path / "c" / "train.jsonl"), rows)
    _write(str(tmp_path / "c" / "validation.jsonl"), rows[:3])
    for family in ("gpt2", "bert"):
        cfg = task_cfg(str(tmp_path / "c"), family=family, seq_len=64, max_examples_per_row=4, shuffle=False)
        it = build_task_iterator(cfg, "train", repeat=False)
        assert it.stats()["truncated_examples"] == 1
        counts = np.zeros(len(rows), int)
        for batch in it:
            for r in range(batch["input_ids"].shape[0]):
                segs = _segments(batch, r)
                assert len(segs) == batch["label_mask"][r].sum() <= 4
                for k, pos in segs:
                    assert np.all(np.diff(pos) == 1)  # one contiguous span per example
                    ex = int(it.last_examples[r, k - 1])
                    counts[ex] += 1
                    text = rows[ex]["text"]
                    ids = batch["input_ids"][r, pos]
                    cls = batch["cls_index"][r, k - 1]
                    if family == "bert":  # [CLS] text [SEP]; the head reads [CLS]
                        assert cls == pos[0] and ids[0] == 4 and ids[-1] == 5
                        body = ids[1:-1]
                    else:  # text EOS; the head reads the example's last token
                        assert cls == pos[-1] and ids[-1] == 2
                        body = ids[:-1]
                    assert _text(body) == text[:len(body)]
                    assert len(body) == min(len(text), 64 - (2 if family == "bert" else 1))
                    assert it.labels.names[batch["labels"][r, k - 1]] == rows[ex]["label"]
                assert batch["label_mask"][r, len(segs):].sum() == 0
        assert counts.tolist() == [1] * len(rows)  # every example exactly once per epoch
        assert 0 < it.stats()["packing_efficiency"] <= 1


def test_text_pairs_get_token_types_and_fit_longest_first(tmp_path, task_cfg):
    rows = [{"text": "a" * 10, "text_pair": "b" * 40, "label": 1}, {"text": "c" * 3, "text_pair": "d", "label": 0}]
    _write(str(tmp_path / "p" / "train.jsonl"), rows)
    _write(str(tmp_path / "p" / "validation.jsonl"), rows)
    cfg = task_cfg(str(tmp_path / "p"), family="bert", num_labels=2, seq_len=32, text_pair_field="text_pair",
                   shuffle=False, max_examples_per_row=2)
    batch = next(build_task_iterator(cfg, "train", repeat=False))
    first = batch["segment_ids"][0] == 1
    ids = batch["input_ids"][0][first]
    text = _text(np.where(ids >= 7, ids, 45 + 7))  # specials shown as "-"
    assert text == "-" + "a" * 10 + "-" + "b" * 19 + "-"  # 32 - 3 specials = 29 = 10 + 19: the longer pair cut
    assert batch["token_type_ids"][0][first].tolist() == [0] * 12 + [1] * 20
    assert fit_pair(30, 30, 29) == (15, 14) and fit_pair(3, 100, 29) == (3, 26)


def test_resume_and_host_shards(tmp_path, task_cfg):
    rows = [{"text": f"example {i} " + "z" * (i % 17), "label": f"c{i % 3}"} for i in range(60)]
    _write(str(tmp_path / "r" / "train.jsonl"), rows)
    _write(str(tmp_path / "r" / "validation.jsonl"), rows[:5])
    cfg = task_cfg(str(tmp_path / "r"), seq_len=48, batch_size=2)
    it = build_task_iterator(cfg, "train")
    for _ in range(15):  # past one epoch (~23 rows): the second epoch visits the rows in a new order
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    for other in (build_task_iterator(cfg, "train", state=state), build_task_iterator(cfg, "train")):
        if not other.get_state()["rows"]:
            other.seek(15)
        for batch in want:
            got = next(other)
            assert all(np.array_equal(got[k], batch[k]) for k in batch)
    texts = []
    for p in range(2):  # two simulated hosts: disjoint shares that together are the validation split
        shard = build_task_iterator(cfg, "validation", process_index=p, process_count=2, repeat=False)
        texts.append({_text(b["input_ids"][r, pos][:-1]) for b in shard
                      for r in range(b["input_ids"].shape[0]) for _, pos in _segments(b, r)})
    assert texts[0] and texts[1] and not texts[0] & texts[1]
    assert texts[0] | texts[1] == {row["text"] for row in rows[:5]}


def test_packing_efficiency_and_inspect_agree_with_the_batches(tmp_path, task_cfg, capsys):
    from jaxctx import cli

    rows = [{"text": "w" * (5 + (7 * i) % 50), "label": f"c{i % 3}"} for i in range(50)]
    _write(str(tmp_path / "e" / "train.jsonl"), rows)
    _write(str(tmp_path / "e" / "validation.jsonl"), rows[:4])
    cfg = task_cfg(str(tmp_path / "e"), seq_len=40, batch_size=2)
    it = build_task_iterator(cfg, "train", repeat=False)
    real = slots = 0
    for batch in it:  # one pass: count real tokens in the rows themselves
        real += int((batch["segment_ids"] > 0).sum())
        slots += batch["segment_ids"].size
    full_rows = it.rows_per_epoch * 40
    assert it.stats()["packing_efficiency"] == pytest.approx(real / full_rows)
    assert real == sum(min(len(r["text"]), 39) + 1 for r in rows)  # text (cut to 39) + EOS per example
    assert it.stats()["truncated_examples"] == sum(len(r["text"]) > 39 for r in rows)
    assert cli.main(["data", "inspect", "--set", f"data.source={tmp_path / 'e'}", "--set", "data.task=classification",
                     "--set", "model.task=sequence_classification", "--set", "model.num_labels=3", "--set",
                     "data.seq_len=40", "--set", f"data.cache_dir={cfg.data.cache_dir}", "--batches", "2",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["packing_efficiency"] == pytest.approx(real / full_rows) and summary["examples"] == 50


def test_pack_rows_first_fit_over_open_rows():
    from jaxctx.data.task_packing import pack_rows

    lengths, order = np.array([30, 30, 5, 5, 12]), np.arange(5)
    ex, bounds = pack_rows(lengths, order, 40, 16, open_rows=2)  # the 5s fill row 0's gap; 12 fits no open row
    assert [ex[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])] == [[0, 2, 3], [1], [4]]
    ex, bounds = pack_rows(lengths, order, 40, 16, open_rows=1)  # strictly in order
    assert [ex[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])] == [[0], [1, 2, 3], [4]]
    ex, bounds = pack_rows(np.full(5, 2), order, 40, 2, open_rows=3)  # E = 2 example slots per row
    assert np.diff(bounds).tolist() == [2, 2, 1]


def test_csv_multi_label_and_regression(tmp_path, task_cfg):
    os.makedirs(tmp_path / "csv")
    for split in ("train", "validation"):
        with open(tmp_path / "csv" / f"{split}.csv", "w") as f:
            f.write('text,label\n"hello, world",pos\nbad day,neg\n')
    it = build_task_iterator(task_cfg(str(tmp_path / "csv"), num_labels=2, shuffle=False), "validation", repeat=False)
    batch = next(it)
    assert it.labels.names == ("neg", "pos") and batch["labels"][0, :2].tolist() == [1, 0]
    assert _text(batch["input_ids"][0][batch["segment_ids"][0] == 1][:-1]) == "hello, world"

    rows = [{"text": "a", "label": ["x", "z"]}, {"text": "b", "label": []}, {"text": "c", "label": ["y"]}]
    _write(str(tmp_path / "ml" / "train.jsonl"), rows)
    _write(str(tmp_path / "ml" / "validation.jsonl"), rows)
    cfg = task_cfg(str(tmp_path / "ml"), problem_type="multi_label", shuffle=False)
    batch = next(build_task_iterator(cfg, "train", repeat=False))
    assert batch["labels"].dtype == np.float32 and batch["labels"].shape == (4, 16, 3)
    assert batch["labels"][0, :3].tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]

    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": -2}]
    _write(str(tmp_path / "rg" / "train.jsonl"), rows)
    _write(str(tmp_path / "rg" / "validation.jsonl"), rows)
    batch = next(build_task_iterator(task_cfg(str(tmp_path / "rg"), num_labels=1, shuffle=False), "train"))
    assert batch["labels"].dtype == np.float32 and batch["labels"][0, :2].tolist() == [0.5, -2.0]
