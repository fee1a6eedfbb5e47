"""Orbax checkpoints: save, restore onto any mesh, latest step, params-only load.

A checkpoint directory is an Orbax `CheckpointManager` root holding one sub-directory per step with three items:
- `params`:    the model parameters (a pytree of arrays, sharded as they were in training);
- `opt_state`: the optimizer state (absent in checkpoints written by `jaxctx convert from-hf`);
- `meta`:      JSON: the resolved config, the step, the data-iterator state.
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves a
`*.orbax-checkpoint-tmp-*` directory that is never mistaken for a checkpoint; we warn about it and use the
previous complete step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """A checkpoint root from either a checkpoint root or a training workdir (which has `checkpoints/`)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def _warn_incomplete(directory: str) -> None:
    leftovers = sorted(name for name in os.listdir(directory) if "orbax-checkpoint-tmp" in name)
    if leftovers:
        warnings.warn(f"{directory}: skipping incomplete checkpoint(s) {', '.join(leftovers)} (a save was "
                      f"interrupted); using the latest complete step", stacklevel=3)


class Checkpointer:
    """Async, keep-N checkpoint manager for (params, opt_state, meta)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # -- queries ---------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        if os.path.isdir(self.directory):
            _warn_incomplete(self.directory)
        steps = self.steps()
        return steps[-1] if steps else None

    # -- save --------------------------------------------------------------------------------------------
    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = True) -> None:
        """Start an (async) save of one step; call `wait()` before relying on it being on disk."""
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(_jsonable(meta))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restore -----------------------------------------------------------------------------------------
    def restore_meta(self, step: int) -> dict:
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple[Any, Any, dict]:
        """Restore onto the shardings carried by the abstract trees (jax.ShapeDtypeStruct with `.sharding`).

        Because the target shardings come from the caller's mesh, a checkpoint saved on one mesh or device count
        restores onto another.
        """
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, dict(out["meta"])


def load_params(path: str | os.PathLike, abstract_params=None, *, step: int | None = None) -> tuple[Any, dict]:
    """Params (and meta) from a checkpoint root or a workdir; latest step unless `step` is given.

    With `abstract_params` the arrays land on its shardings; without, they come back as host numpy arrays.
    """
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory, read_only=True, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    meta = ckpt.restore_meta(step)
    if abstract_params is None:
        # Restore every array onto one local device whatever mesh saved it, then hand back host numpy.
        metadata = ckpt._manager.item_metadata(step)["params"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        to_host = True
    else:
        to_host = False
    args = ocp.args.StandardRestore(abstract_params)
    params = ckpt._manager.restore(step, args=ocp.args.Composite(params=args))["params"]
    ckpt.close()
    if to_host:
        params = jax.tree.map(np.asarray, params)
    return params, meta


def save_params(path: str | os.PathLike, params, meta: dict, *, step: int = 0) -> str:
    """Write a params-only checkpoint (no optimizer state), e.g. a converted Hugging Face model."""
    ckpt = Checkpointer(path, keep=1, async_save=False)
    ckpt.save(step, params, None, meta)
    ckpt.close()
    return ckpt.directory


def _jsonable(value):
    """Turn numpy scalars/arrays inside meta into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
