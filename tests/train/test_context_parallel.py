"""Context parallelism in training: `parallel.sequence` splits every sequence over devices (ring attention).

Everything runs on the 8 fake CPU devices of the suite; the kernel itself is tested in tests/ops/test_ring.py.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.parallel import batch_sharding, make_mesh
from jaxctx.train.loop import run
from jaxctx.train.runner import make_runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
T = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Short documents (4-60 bytes), so every 64-token row packs several: segment ids and positions that
    restart inside a device's shard and across shard boundaries."""
    root = tmp_path_factory.mktemp("cp_corpus")
    rng = np.random.default_rng(0)
    words = ["ring", "attention", "zigzag", "device", "token", "shard", "block", "sequence", "a", "of"]
    path = root / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(400):
            text = " ".join(rng.choice(words, size=rng.integers(1, 9)))
            f.write(json.dumps({"text": text}) + "\n")
    return str(path), str(root / "cache")


def cfg(corpus, *overrides):
    path, cache = corpus
    return config_lib.load(TINY, [f"data.source={path}", f"data.cache_dir={cache}", "data.num_proc=1",
                                  f"data.seq_len={T}", "data.validation_fraction=0", "train.batch_size=4",
                                  "train.steps=10", "train.log_every=1", "train.checkpoint_every=100",
                                  "model.num_heads=4", *overrides])


def numbers(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def assert_same_run(got, want):
    assert [r[0] for r in got] == [r[0] for r in want]
    np.testing.assert_allclose(np.array(got)[:, 1:], np.array(want)[:, 1:], rtol=1e-5, atol=1e-5)


FAMILIES = {
    "gpt2": ("model.family=gpt2",),
    "llama-gqa": ("model.family=llama", "model.num_kv_heads=2"),
    "bert": ("model.family=bert",),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequence_parallel_training_matches_one_device(tmp_path, corpus, family, capsys):
    """10 steps with each sequence split over 4 devices give the 1-device losses and gradient norms."""
    one = cfg(corpus, *FAMILIES[family])
    assert run(one, str(tmp_path / "one"), devices=jax.devices()[:1]) == 0
    split = cfg(corpus, *FAMILIES[family], "parallel.sequence=4")
    assert run(split, str(tmp_path / "four"), devices=jax.devices()[:4]) == 0
    assert "'sequence': 4" in capsys.readouterr().err  # the run really used the axis
    got, want = numbers(tmp_path / "four"), numbers(tmp_path / "one")
    assert len(want) == 10
    assert_same_run(got, want)


@pytest.mark.slow
def test_data_fsdp_sequence_mesh_with_chunks_and_all_gather(tmp_path, corpus):
    """2 (data) x 2 (fsdp) x 2 (sequence) over 8 devices, chunked MLP and loss inside each device's tokens,
    K/V all-gathered instead of rotated: still the 1-device run."""
    extra = ("model.family=llama", "model.num_kv_heads=2", "model.mlp_chunk=16", "model.loss_chunk=16")
    assert run(cfg(corpus, *extra), str(tmp_path / "one"), devices=jax.devices()[:1]) == 0
    mesh = cfg(corpus, *extra, "parallel.data=2", "parallel.fsdp=2", "parallel.sequence=2",
               "model.context_parallel=all_gather")
    assert run(mesh, str(tmp_path / "eight"), devices=jax.devices()[:8]) == 0
    assert_same_run(numbers(tmp_path / "eight"), numbers(tmp_path / "one"))


@pytest.mark.slow
def test_checkpoints_do_not_depend_on_the_sequence_axis(tmp_path, corpus):
    """Saved with sequence=4, resumed with sequence=1, then again with sequence=4: the uninterrupted run."""
    base = ("model.family=gpt2", "train.checkpoint_every=3")
    assert run(cfg(corpus, *base, "train.steps=8"), str(tmp_path / "ref"), devices=jax.devices()[:1]) == 0
    work = str(tmp_path / "work")
    assert run(cfg(corpus, *base, "train.steps=8", "train.stop_after=3", "parallel.sequence=4"), work,
               devices=jax.devices()[:4]) == 0
    assert run(cfg(corpus, *base, "train.steps=8", "train.stop_after=6"), work, devices=jax.devices()[:1]) == 0
    assert run(cfg(corpus, *base, "train.steps=8", "parallel.sequence=4"), work, devices=jax.devices()[:4]) == 0
    assert_same_run(numbers(work), numbers(tmp_path / "ref"))


def _compiled_step(config, devices):
    mesh = make_mesh(config.parallel, devices)
    runner = make_runner(config, mesh)
    sharding = batch_sharding(mesh)
    shapes = {name: jax.ShapeDtypeStruct((4, T), dtype, sharding=sharding) for name, dtype in
              (("input_ids", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
               ("segment_ids", np.int32), ("positions", np.int32))}
    return sharding, runner.lower(shapes).compile()


def test_the_step_splits_the_length_and_runs_the_strategy(corpus):
    """The batch's length axis is sharded over `sequence`; the ring rotates K/V with collective-permutes (the
    all-gather strategy only permutes the batch into the layout, once), the all-gather strategy gathers them."""
    hlo = {}
    for strategy in ("ring", "all_gather"):
        config = cfg(corpus, "parallel.sequence=4", f"model.context_parallel={strategy}")
        sharding, compiled = _compiled_step(config, jax.devices()[:4])
        assert sharding.shard_shape((4, T)) == (4, T // 4)
        hlo[strategy] = compiled.as_text()
    permutes = {s: text.count(" collective-permute(") for s, text in hlo.items()}
    assert permutes["ring"] > permutes["all_gather"] + 4, permutes  # K, V, positions, segments: each layer
    assert " all-gather(" in hlo["all_gather"]


def test_sequence_one_keeps_the_length_whole(corpus):
    sharding, compiled = _compiled_step(cfg(corpus), jax.devices()[:1])
    assert sharding.shard_shape((4, T)) == (4, T)
    assert "collective-permute" not in compiled.as_text()


@pytest.mark.parametrize("overrides, message", [
    (("parallel.sequence=4", "data.seq_len=60"), "data.seq_len=60 must be divisible by 2 x parallel.sequence"),
    (("parallel.sequence=2", "model.attention=xla"), "model.attention=xla cannot split a sequence"),
    (("parallel.sequence=4", "model.loss_chunk=32"), "model.loss_chunk=32 exceeds the 16 tokens"),
    (("parallel.sequence=2", "parallel.mode=pmap"), "parallel.mode=pmap is data parallel only"),
    (("parallel.sequence=0",), "parallel.sequence"),
])
def test_config_errors_name_the_keys(corpus, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        cfg(corpus, *overrides)


def test_mesh_product_must_match_the_devices(corpus):
    with pytest.raises(config_lib.ConfigError, match=r"parallel\.sequence=3 .* does not divide the 8 devices"):
        make_mesh(cfg(corpus, "parallel.sequence=3", "data.seq_len=96").parallel, jax.devices()[:8])
