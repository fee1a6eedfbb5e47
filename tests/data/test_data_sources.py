"""Sources and bad input: every mistake gives a ValueError/FileNotFoundError naming the file, field or value."""

import json
import os

import numpy as np
import pytest

from jaxctx.config import ConfigError, load
from jaxctx.data import errors
from jaxctx.data.pipeline import build_iterator
from jaxctx.data.sources import load_documents, stdlib_files, in_split


def _build(cfg, split="train"):
    return build_iterator(cfg, split, process_index=0, process_count=1)


def test_text_json_and_parquet_sources_give_the_same_documents(make_cfg, tmp_path, dh):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = dh.random_texts(30)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts)
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    sources = [dict(source=str(tmp_path / "txt" / "*.txt")), dict(source=str(tmp_path / "txt")),
               dict(source=str(tmp_path / "a.jsonl"), text_field="body"),
               dict(source=str(tmp_path / "a.parquet"), text_field="body")]
    for kwargs in sources:
        ds = load_documents(make_cfg(validation_fraction=0.0, **kwargs).data, "train").dataset
        assert sorted(ds["text"]) == sorted(texts), kwargs


def test_text_units(make_cfg, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("para one\nline two\n\npara two\n\n\n", encoding="utf-8")
    count = {unit: len(load_documents(make_cfg(source=str(path), text_unit=unit, validation_fraction=0.0).data)
                       .dataset) for unit in ("document", "paragraph", "line")}
    assert count == {"document": 1, "paragraph": 2, "line": 3}  # empty lines are dropped


def test_streaming_source(make_cfg, corpus, dh):
    texts = dh.random_texts(20)
    cfg = make_cfg(source=corpus(texts), streaming=True, validation_fraction=0.0)
    assert sorted(ex["text"] for ex in load_documents(cfg.data).dataset) == sorted(texts)


def test_stdlib_split_is_deterministic_and_disjoint():
    root, files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any(f"{os.sep}site-packages{os.sep}" in f or f"{os.sep}test{os.sep}" in f for f in files)
    rel = [os.path.relpath(f, root) for f in files]
    val = {r for r in rel if in_split(r, "validation", 0.1)}
    train = {r for r in rel if in_split(r, "train", 0.1)}
    assert val and train and val.isdisjoint(train) and val | train == set(rel)
    assert 0.05 < len(val) / len(rel) < 0.15


def test_missing_file(make_cfg, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _build(make_cfg(source=str(missing)))


def test_glob_matching_nothing(make_cfg, tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(errors.DataFileNotFoundError, match=r"no files match .*\*\.parquet"):
        _build(make_cfg(source=pattern))


def test_empty_after_filtering(make_cfg, corpus):
    with pytest.raises(errors.EmptyDatasetError, match="after dropping empty documents"):
        _build(make_cfg(source=corpus(["", "   ", "\n\n"])))
    with pytest.raises(ValueError, match="validation_fraction=0"):
        _build(make_cfg(source=corpus(), validation_fraction=0.0), split="validation")


def test_missing_text_field(make_cfg, corpus):
    source = corpus(field="body")
    with pytest.raises(errors.MissingFieldError, match=r"'content'.*columns are: body, id"):
        _build(make_cfg(source=source, text_field="content"))
    with pytest.raises(errors.DataError, match="'id' .* not strings"):
        _build(make_cfg(source=source, text_field="id"))


def test_mixed_formats(make_cfg, tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="mixes file formats"):
        _build(make_cfg(source=str(tmp_path)))


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_bytes_are_replaced_counted_and_warned(make_cfg, tmp_path, name):
    path = tmp_path / name
    good = "caf\u00e9 ok " * 20
    raw = good.encode() + b"\xff\xfe broken \xc3" + good.encode()  # 3 invalid bytes
    if name.endswith(".jsonl"):
        raw = b'{"text": "' + raw + b'"}\n{"text": "' + good.encode() + b'"}\n'
    path.write_bytes(raw)
    cfg = make_cfg(source=str(path), validation_fraction=0.0, seq_len=16)
    with pytest.warns(UnicodeWarning, match=rf"replaced 3 invalid UTF-8 bytes .*{name} \(3 bytes\)"):
        it = _build(cfg)
    assert it.stats()["invalid_utf8_bytes"] == 3
    ids = np.concatenate([next(it)["input_ids"].ravel() for _ in range(30)])
    assert "\ufffd" in it.tokenizer.decode(ids)  # replaced, not dropped


def test_tokenizer_dir_without_files(make_cfg, corpus, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("no tokenizer here")
    with pytest.raises(errors.TokenizerFilesError, match=r"tok holds no tokenizer files .*tokenizer\.json"):
        _build(make_cfg(source=corpus(), tokenizer=str(empty)))
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing directory"):
        _build(make_cfg(source=corpus(), tokenizer=str(tmp_path / "absent")))


def test_seq_len_below_two(make_cfg):
    with pytest.raises(ConfigError, match="data.seq_len=1"):
        load(None, ["data.seq_len=1"])


def test_vocab_larger_than_model(make_cfg, corpus):
    with pytest.raises(errors.VocabSizeError, match=r"263 ids but model.vocab_size=200.*>=263"):
        _build(make_cfg(source=corpus(), vocab_size=200))


def test_batch_not_divisible_by_processes(make_cfg, corpus):
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by the 2 processes"):
        build_iterator(make_cfg(source=corpus(), batch_size=3), process_index=0, process_count=2)


def test_more_processes_than_documents(make_cfg, corpus):
    with pytest.raises(errors.EmptyDatasetError, match="fewer than the 4 processes"):
        build_iterator(make_cfg(source=corpus(["a", "b"]), validation_fraction=0.0), process_index=0,
                       process_count=4)
