"""train.init_from into a task model: backbone from the checkpoint, head fresh and named in one log line."""

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
from jaxctx.train.warm_start import task_params

MODEL = {"family": "bert", "num_layers": 1, "num_heads": 2, "d_model": 16, "vocab_size": 40, "attention": "reference"}


def config(**model):
    return config_lib.from_dict({"model": {**MODEL, **model}, "data": {"seq_len": 16},
                                 "train": {"batch_size": 1}}).resolved()


def random_params(cfg, seed):
    abstract = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), meta.unbox(abstract))


def checkpoint(tmp_path, cfg, seed=1):
    params = random_params(cfg, seed)
    save_params(str(tmp_path / "base"), params, {"config": cfg.to_dict(), "step": 0})
    return str(tmp_path / "base"), params


def start(task_cfg, path):
    cfg = config_lib.from_dict({**task_cfg.to_dict(), "train": {**task_cfg.to_dict()["train"], "init_from": path}})
    runner = make_runner(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    lines = []
    return task_params(cfg.resolved(), runner, log=lines.append), lines


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
