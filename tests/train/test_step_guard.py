"""The train step's non-finite guard: a step whose loss or gradients are not finite leaves params and optimizer
state bit-identical and reports `finite=False`, on the jit path (sharded, donated state) and the pmap path.

The loop-level test (test_train_loop.py) only sees that training stops; this one sees the state itself, so it fails
if the guard is removed (the NaN update would then be applied) or if `finite` stops reporting it.
"""

import functools
import os

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.parallel import make_mesh
from jaxctx.train.runner import make_runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SEQ = 32


@functools.lru_cache(maxsize=None)  # one compiled step per mode, shared by the poison cases
def _runner(mode: str):
    # lr is at its peak from step 0 (no warmup), so a step that the guard failed to stop really changes the state.
    overrides = [f"parallel.mode={mode}", f"data.seq_len={SEQ}", "train.warmup_steps=0", "train.decay=constant",
                 "model.num_layers=1"]
    if mode == "jit":
        overrides += ["parallel.data=2", "parallel.fsdp=2"]
    cfg = config_lib.load(TINY, overrides)
    # jit: a 2 x 2 (data x fsdp) mesh, params sharded and the state donated; pmap: every local device.
    devices = jax.devices()[:4] if mode == "jit" else None
    return make_runner(cfg, make_mesh(cfg.parallel, devices)), cfg


def _batch(cfg, *, poison: bool):
    rng = np.random.default_rng(0)
    b = cfg.train.batch_size
    ids = rng.integers(0, 256, (b, SEQ + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, SEQ), np.float32),
             "segment_ids": np.ones((b, SEQ), np.int32),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (b, SEQ)).copy()}
    if poison:  # one infinite weight: the loss (inf / inf) and every gradient become non-finite
        batch["loss_mask"][3, 5] = np.inf
    return batch


def _host(tree):
    """A host copy (the jit step donates its input state, so the device buffers are gone after the call)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} changed"


def _poison_params(runner, state, mode):
    """The same state with one NaN in the first attention/MLP kernel (loss and gradients become NaN)."""
    host = _host(state)
    if mode == "pmap":
        host = jax.tree.map(lambda x: x[0], host)  # one replica; put back on every device below
    leaves, treedef = jax.tree_util.tree_flatten_with_path(host.params)
    flat = [x for _, x in leaves]
    idx = next(i for i, (p, _) in enumerate(leaves) if "kernel" in jax.tree_util.keystr(p))
    flat[idx] = flat[idx].copy()
    flat[idx].reshape(-1)[0] = np.nan
    host = host.replace(params=jax.tree.unflatten(treedef, flat))
    return runner._replicate(host) if mode == "pmap" else jax.device_put(host, runner.state_shardings)


@pytest.mark.parametrize("mode", ["jit", "pmap"])
@pytest.mark.parametrize("poison", ["batch", "params"])
def test_non_finite_step_leaves_state_bit_identical(mode, poison):
    runner, cfg = _runner(mode)
    state = runner.init(0)

    # A good step first: the state really moves (so "unchanged" below is not vacuous) and finite is True.
    before = _host(state)
    state, metrics = runner.step(state, runner.put_batch(_batch(cfg, poison=False)))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    after_good = _host(state)
    assert any(x.tobytes() != y.tobytes() for x, y in zip(jax.tree.leaves(before.params),
                                                           jax.tree.leaves(after_good.params)))

    if poison == "params":
        state = _poison_params(runner, state, mode)
    want = _host(state)
    state, metrics = runner.step(state, runner.put_batch(_batch(cfg, poison=poison == "batch")))
    got = _host(state)
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(float(metrics["grad_norm"]))
    _bit_identical(got.params, want.params)
    _bit_identical(got.opt_state, want.opt_state)
