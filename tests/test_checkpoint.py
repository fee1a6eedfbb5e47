"""Checkpointer: incomplete saves are skipped with a warning; params-only load to host; errors name the path."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.checkpoint import Checkpointer, checkpoint_dir, load_params, save_params


def _params(scale):
    return {"w": jnp.full((4, 3), scale, jnp.float32), "b": {"bias": jnp.arange(3.0) * scale}}


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _params(step), None, {"step": step})
    ckpt.wait()
    # What a crash in the middle of an Orbax save leaves behind: a temporary directory, never renamed.
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234" / "params")
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert ckpt.latest_step() == 2
    ckpt.close()
    with pytest.warns(UserWarning, match="skipping incomplete"):
        params, meta = load_params(tmp_path)
    assert meta["step"] == 2
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 2.0))


def test_params_only_roundtrip_to_host_and_onto_shardings(tmp_path):
    save_params(tmp_path / "ckpt", _params(5.0), {"config": {"model": {}}, "step": 0})
    params, meta = load_params(tmp_path / "ckpt")
    assert isinstance(params["w"], np.ndarray) and meta["step"] == 0
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=sharding),
                "b": {"bias": jax.ShapeDtypeStruct((3,), jnp.float32,
                                                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}}
    placed, _ = load_params(tmp_path / "ckpt", abstract)
    assert placed["w"].sharding == sharding
    np.testing.assert_array_equal(placed["b"]["bias"], np.arange(3.0) * 5.0)


def test_workdir_resolves_to_its_checkpoints(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    assert checkpoint_dir(tmp_path) == str(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_params(tmp_path)
