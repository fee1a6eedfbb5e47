"""Fixtures for the data-pipeline tests: a per-session datasets cache, configs, small corpora written to tmp."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """One datasets cache for the session: later tests reuse the Arrow files earlier ones tokenized."""
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture
def make_cfg(hf_cache):
    """make_cfg(family="gpt2", batch_size=4, seed=0, **data_fields) -> a resolved Config."""
    from jaxctx.config import from_dict

    def make(family="gpt2", batch_size=4, seed=0, vocab_size=512, **data):
        data = {"cache_dir": hf_cache, "num_proc": 1, **data}
        return from_dict({"model": {"family": family, "vocab_size": vocab_size}, "data": data,
                          "train": {"batch_size": batch_size, "seed": seed}}).resolved()

    return make


def random_texts(n, seed=0, min_len=1, max_len=300):
    """n distinct documents of varied lengths; each starts with a unique tag so tests can identify it."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghij klmnopqrstuvwxyz.,\né"))
    texts = []
    for i in range(n):
        body = "".join(rng.choice(alphabet, rng.integers(min_len, max_len)))
        texts.append(f"<d{i:05d}>{body}")
    return texts


@pytest.fixture
def corpus(tmp_path):
    """write(texts=None, name="docs.jsonl", field="text") -> path of a jsonl file with one document per line."""

    def write(texts=None, name="docs.jsonl", field="text", n=60, seed=0):
        texts = random_texts(n, seed) if texts is None else texts
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({field: t, "id": len(t)}) + "\n")
        return str(path)

    return write


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def dh():
    """Helper functions (fixtures, not imports: test directories without __init__.py cannot share modules)."""
    import types

    return types.SimpleNamespace(random_texts=random_texts, take=take, assert_batches_equal=assert_batches_equal)
