"""`jaxctx data make-task`: the stdlib tasks' labels match their files, names do not leak, tags are tokenize's."""

import io
import json
import os
import tokenize

import pytest

from jaxctx.data import stdlib_tasks
from jaxctx.data.errors import DataError
from jaxctx.data.sources import stdlib_files


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def package_task(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pkg") / "task")
    stdlib_tasks.make_task("stdlib-package", out)
    return out


def test_package_labels_match_their_files_and_names_do_not_leak(package_task):
    root, files = stdlib_files()
    # independent truth: every file of each family, masked; a row's text must be one of its own family's files
    by_text = {}
    for path in files:
        rel = os.path.relpath(path, root).split(os.sep)
        if len(rel) > 1 and rel[0] in stdlib_tasks.FAMILIES:
            with open(path, encoding="utf-8", errors="replace") as f:
                by_text.setdefault(stdlib_tasks.mask_names(f.read()), set()).add(rel[0])
    train, val = _rows(f"{package_task}/train.jsonl"), _rows(f"{package_task}/validation.jsonl")
    assert {r["label"] for r in val} == set(stdlib_tasks.FAMILIES)  # every class is validated
    texts = [r["text"] for r in train + val]
    assert len(set(texts)) == len(texts)  # no file twice, so no train/validation overlap
    for row in train + val:
        assert row["label"] in by_text[row["text"]]
        low = row["text"].lower()
        for name in stdlib_tasks.FAMILIES + ("idle", "2to3"):  # not even inside other words ("_asynciomodule")
            assert name not in low
    summary = json.load(open(f"{package_task}/task.json"))
    assert summary["labels"] == list(stdlib_tasks.FAMILIES)
    assert sum(summary["counts"]["train"].values()) == len(train)


def test_make_task_is_deterministic_and_refuses_to_overwrite(package_task, tmp_path):
    again = str(tmp_path / "again")
    stdlib_tasks.make_task("stdlib-package", again)
    for name in ("train.jsonl", "validation.jsonl"):
        assert open(f"{again}/{name}", "rb").read() == open(f"{package_task}/{name}", "rb").read()
    with pytest.raises(DataError, match="--force"):
        stdlib_tasks.make_task("stdlib-package", again)
    stdlib_tasks.make_task("stdlib-package", again, force=True)
    assert sorted(os.listdir(again)) == ["task.json", "train.jsonl", "validation.jsonl"]


def test_token_tags_are_tokenize_classes(tmp_path):
    out = str(tmp_path / "tok")
    stdlib_tasks.make_task("stdlib-tokens", out)
    rows = _rows(f"{out}/train.jsonl") + _rows(f"{out}/validation.jsonl")
    assert all(len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= set(stdlib_tasks.TAGS) for r in rows)
    # a sample source, re-tokenized here: one B- tag per Python token in order, I- for its further words
    source = "import os  # a comment here\nx = len('a b') + 0x1F\nif x: print(x)\n"
    words, tags = zip(*[(w, t) for ws, ts in stdlib_tasks.tag_source(source) for w, t in zip(ws, ts)])
    expected = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        cls = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.COMMENT: "comment",
               tokenize.OP: "operator"}.get(tok.type)
        if tok.type == tokenize.NAME:
            cls = "keyword" if tok.string in ("import", "if") else "builtin" if tok.string in ("len", "print") \
                else "name"
        if cls:
            expected += [(p, f"{'I' if i else 'B'}-{cls}") for i, p in enumerate(tok.string.split())]
    assert list(zip(words, tags)) == expected
    assert tags[:6] == ("B-keyword", "B-name", "B-comment", "I-comment", "I-comment", "I-comment")
    # and on a real file of the task: every B- tag starts one Python token of that class
    first = rows[0]
    assert sum(t.startswith("B-") for t in first["tags"]) >= 1 and first["tags"][0].startswith("B-")
