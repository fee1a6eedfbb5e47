"""train.init_from: into a task model (backbone from the checkpoint, head fresh and named in one log line), and a
longer context than the checkpoint's learned position table (train.extend_positions), for LM and task models, on
one device and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxctx import config as config_lib
from jaxctx.checkpoint import save_params
from jaxctx.errors import CheckpointError
from jaxctx.models import build
from jaxctx.parallel import make_mesh
from jaxctx.train.runner import make_runner
from jaxctx.convert.mapping import resize_positions
from jaxctx.train.warm_start import lm_params, task_params

# Tests here compile the same steps again and again: tests/conftest.py's persistent cache compiles each once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

MODEL = {"family": "bert", "num_layers": 1, "num_heads": 2, "d_model": 16, "vocab_size": 40, "attention": "reference"}


def config(seq_len=16, **model):
    return config_lib.from_dict({"model": {**MODEL, **model}, "data": {"seq_len": seq_len},
                                 "train": {"batch_size": 1}}).resolved()


def random_params(cfg, seed):
    abstract = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), meta.unbox(abstract))


def checkpoint(tmp_path, cfg, seed=1):
    params = random_params(cfg, seed)
    save_params(str(tmp_path / "base"), params, {"config": cfg.to_dict(), "step": 0})
    return str(tmp_path / "base"), params


def start(task_cfg, path, devices=1, **train):
    cfg = config_lib.from_dict({**task_cfg.to_dict(),
                                "train": {**task_cfg.to_dict()["train"], "init_from": path, **train}}).resolved()
    runner = make_runner(cfg, make_mesh(cfg.parallel, jax.devices()[:devices]))
    lines = []
    load = task_params if cfg.model.task != "lm" else lm_params
    return load(cfg, runner, log=lines.append), lines


def test_mlm_checkpoint_into_sequence_model(tmp_path):
    path, base = checkpoint(tmp_path, config())
    task = config(task="sequence_classification", num_labels=3)
    params, lines = start(task, path)
    for name in ("token_embed", "pos_embed", "type_embed", "embed_norm", "layers"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params[name]), base[name])
    # the head is what a fresh model of the same seed has (up to XLA's float rounding: jitted vs eager init)
    fresh = meta.unbox(build(task).init(jax.random.PRNGKey(task.train.seed), jnp.zeros((1, 8), jnp.int32))["params"])
    for name in ("pooler", "classifier"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                     jax.tree.map(np.asarray, params[name]), jax.tree.map(np.asarray, fresh[name]))
    assert np.abs(np.asarray(params["pooler"]["kernel"])).max() > 0  # an initialised kernel, not zeros
    assert len(lines) == 1
    assert "initialised fresh: classifier/bias [3], classifier/kernel [16, 3], pooler/bias [16], pooler/kernel " \
           "[16, 16]" in lines[0] and "not used: mlm_head" in lines[0], lines


def test_pretraining_checkpoint_brings_its_pooler(tmp_path):
    path, base = checkpoint(tmp_path, config(nsp_head=True))
    params, lines = start(config(task="sequence_classification", num_labels=2), path)
    np.testing.assert_array_equal(np.asarray(params["pooler"]["kernel"]), base["pooler"]["kernel"])
    assert "initialised fresh: classifier/bias [2], classifier/kernel [16, 2];" in lines[0], lines
    assert "not used: mlm_head, nsp_head" in lines[0]


def test_task_checkpoint_with_other_num_labels_is_refused(tmp_path):
    path, _ = checkpoint(tmp_path, config(task="token_classification", num_labels=2))
    with pytest.raises(CheckpointError, match=r"classifier/kernel has shape \(16, 2\) in the checkpoint, the model "
                                              r"needs \(16, 5\)"):
        start(config(task="token_classification", num_labels=5), path)


@pytest.mark.parametrize("method", ["tile", "copy", "interpolate"])
@pytest.mark.parametrize("task", ["lm", "sequence_classification"])
def test_longer_context_resizes_the_position_table(tmp_path, method, task):
    path, base = checkpoint(tmp_path, config())  # a 16-position table
    longer = config(seq_len=48, task=task, **({"num_labels": 2} if task != "lm" else {}))
    params, lines = start(longer, path, extend_positions=method)
    want = resize_positions(base["pos_embed"]["embedding"], 48, method, longer.model.initializer_range,
                            longer.train.seed)
    np.testing.assert_array_equal(np.asarray(params["pos_embed"]["embedding"]), want)
    assert want.shape == (48, 16) and np.array_equal(want[:16], base["pos_embed"]["embedding"]) == (method != "interpolate")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["layers"]), base["layers"])
    assert any("position table [16, 16] -> [48, 16]" in line for line in lines), lines


def test_longer_context_on_a_sharded_mesh(tmp_path):
    """fsdp=4 shards the table's rows; the checkpoint's 16 rows are restored replicated, then resized onto it."""
    path, base = checkpoint(tmp_path, config())
    cfg = config_lib.from_dict({**config(seq_len=64).to_dict(), "parallel": {"data": 2, "fsdp": 4}}).resolved()
    params, _ = start(cfg, path, devices=8, extend_positions="tile", batch_size=8)
    table = params["pos_embed"]["embedding"]
    assert table.shape == (64, 16) and len(table.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(table), np.tile(base["pos_embed"]["embedding"], (4, 1)))


def test_longer_context_without_extend_positions_is_refused(tmp_path):
    path, _ = checkpoint(tmp_path, config())
    with pytest.raises(CheckpointError, match=r"has a learned position table of 16 rows but "
                                              r"model.max_positions=32: set train.extend_positions to tile, copy or "
                                              r"interpolate"):
        start(config(seq_len=32), path)
    with pytest.raises(config_lib.ConfigError, match="train.extend_positions='stretch' is not one of tile, copy"):
        start(config(seq_len=32), path, extend_positions="stretch")
