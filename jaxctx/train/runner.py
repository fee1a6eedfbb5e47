"""How the pure step runs on devices: `jax.jit` over a sharded mesh, or `jax.pmap` data parallelism.

Both runners expose the same small interface to the loop (init, restore, save, put_batch, step, eval), so the
loop never branches on the parallelism mode. Checkpoints are identical in both modes (unreplicated params and
optimizer state), so a run can switch modes on resume.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxctx import models
from jaxctx.config import Config, ConfigError
from jaxctx.parallel import MESH_AXES, batch_sharding, data_group, data_parallel_size
from jaxctx.train.optimizer import build_optimizer, learning_rate_schedule
from jaxctx.train.state import abstract_state, create_state
from jaxctx.train.step import (TrainState, make_eval_step, make_pmap_train_step, make_train_step)


def dropout_seed(cfg: Config) -> int | None:
    """train.seed when the model has any dropout (the step then draws dropout keys from it), else None."""
    return cfg.train.seed if cfg.model.dropout > 0.0 or cfg.model.attention_dropout > 0.0 else None


def make_runner(cfg: Config, mesh: Mesh):
    """The runner for `parallel.mode` (checks that the batch splits evenly over the data-parallel devices)."""
    runner = PmapRunner(cfg, mesh) if cfg.parallel.mode == "pmap" else JitRunner(cfg, mesh)
    dp = runner.data_parallel
    per_micro = cfg.train.batch_size // cfg.train.grad_accum
    if per_micro % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} = "
                          f"{per_micro} sequences per micro-batch must be divisible by the data-parallel size "
                          f"{dp} ({'local devices' if cfg.parallel.mode == 'pmap' else 'mesh data x fsdp'})")
    return runner


class JitRunner:
    """One jitted step; params/optimizer state sharded by logical-axis rules; state donated."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.model = models.build(cfg)
        self.optimizer = build_optimizer(cfg.train)
        self.schedule = learning_rate_schedule(cfg.train)
        self.batch_sharding = batch_sharding(mesh)
        self.data_parallel = data_parallel_size(mesh)
        self.data_group = data_group(mesh)  # the rows this process feeds (refuses layouts that cannot be fed)
        self._abstract, self.state_shardings = abstract_state(self.model, self.optimizer, cfg.data.seq_len, mesh)
        step = make_train_step(self.model, self.optimizer, self.schedule, cfg.train.grad_accum,
                               dropout_seed=dropout_seed(cfg))
        self._step = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, None), donate_argnums=0)
        eval_step = make_eval_step(self.model)
        self._eval = jax.jit(eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding))

    # -- state ------------------------------------------------------------------------------------------
    def init(self, seed: int) -> TrainState:
        with jax.set_mesh(self.mesh):
            state, _ = create_state(self.model, self.optimizer, self.cfg.data.seq_len, self.mesh, seed)
        return state

    def abstract_params(self):
        return self._abstract.params

    def with_params(self, state: TrainState, params) -> TrainState:
        """Swap in loaded params and start a fresh optimizer state for them (train.init_from)."""
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        return state.replace(params=params, opt_state=opt_state)

    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self._abstract.params))

    def restore(self, ckpt, step: int):
        params, opt_state, meta = ckpt.restore(step, self._abstract.params, self._abstract.opt_state)
        state = TrainState(step=jax.device_put(jnp.int32(meta["step"]), self.state_shardings.step),
                           params=params, opt_state=opt_state)
        return state, meta

    def save(self, ckpt, step: int, state: TrainState, meta: dict) -> None:
        ckpt.save(step, state.params, state.opt_state, meta)

    # -- steps ------------------------------------------------------------------------------------------
    def put_batch(self, local_batch: dict):
        from jaxctx.data import make_global_batch
        return make_global_batch(local_batch, self.batch_sharding, groups=self.data_group.count)

    def step(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def lower(self, batch):
        """The jitted step lowered for `batch` (arrays or `jax.ShapeDtypeStruct`s with the batch sharding) and the
        abstract state: `.compile()` gives its memory analysis before anything is allocated (jaxctx.bench)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(self._abstract, batch)

    def eval(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._eval(state.params, batch)


class PmapRunner:
    """Data parallelism with `jax.pmap`: state replicated per local device, batch split on a leading axis."""

    def __init__(self, cfg: Config, mesh: Mesh):
        if cfg.parallel.fsdp != 1 or cfg.parallel.tensor != 1:
            raise ConfigError("parallel.mode=pmap is data parallel only: set parallel.fsdp=1 and "
                              "parallel.tensor=1 (or use parallel.mode=jit)")
        self.cfg, self.mesh = cfg, mesh
        self.devices = jax.local_devices()
        self.data_parallel = len(self.devices) * jax.process_count()
        self.model = models.build(cfg)
        self.optimizer = build_optimizer(cfg.train)
        self.schedule = learning_rate_schedule(cfg.train)
        self._single = Mesh(np.asarray(self.devices[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
        self._abstract, _ = abstract_state(self.model, self.optimizer, cfg.data.seq_len, self._single)
        self._one_device = jax.sharding.SingleDeviceSharding(self.devices[0])
        step = make_pmap_train_step(self.model, self.optimizer, self.schedule, cfg.train.grad_accum,
                                    dropout_seed=dropout_seed(cfg))
        self._step = jax.pmap(step, axis_name="batch", donate_argnums=0)
        eval_step = make_eval_step(self.model)
        self._eval = jax.pmap(lambda p, b: jax.lax.psum(eval_step(p, b), "batch"), axis_name="batch")

    def _replicate(self, tree):
        """One copy per local device stacked on a leading axis (what pmap takes), copied device to device."""
        sharding = NamedSharding(Mesh(np.asarray(self.devices), ("pmap",)), P("pmap"))

        def replicate(x):
            x = jnp.asarray(x)
            shards = [jax.device_put(x[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((len(self.devices), *x.shape), sharding, shards)

        return jax.tree.map(replicate, tree)

    def _unreplicate(self, tree):
        return jax.tree.map(lambda x: x[0], tree)

    def init(self, seed: int) -> TrainState:
        state, _ = create_state(self.model, self.optimizer, self.cfg.data.seq_len, self._single, seed)
        return self._replicate(state)

    def abstract_params(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._one_device),
                            self._abstract.params)

    def with_params(self, state, params):
        return self._replicate(TrainState(step=jnp.int32(0), params=params, opt_state=self.optimizer.init(params)))

    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self._abstract.params))

    def restore(self, ckpt, step: int):
        on_one = lambda t: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._one_device), t)
        params, opt_state, meta = ckpt.restore(step, on_one(self._abstract.params), on_one(self._abstract.opt_state))
        return self._replicate(TrainState(step=jnp.int32(meta["step"]), params=params, opt_state=opt_state)), meta

    def save(self, ckpt, step: int, state, meta: dict) -> None:
        state = self._unreplicate(state)
        ckpt.save(step, state.params, state.opt_state, meta)

    def put_batch(self, local_batch: dict):
        n = len(self.devices)
        return {k: np.asarray(v).reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}

    def step(self, state, batch):
        state, metrics = self._step(state, batch)
        return state, jax.tree.map(lambda x: x[0], metrics)

    def eval(self, state, batch):
        return jax.tree.map(lambda x: x[0], self._eval(state.params, batch))
