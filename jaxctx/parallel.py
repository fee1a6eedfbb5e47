"""Device mesh, logical-axis rules and the shardings of train state and batches.

The mesh has four axes, sized by `parallel.*` in the config:
- `data`:     pure data parallelism (params replicated along it);
- `fsdp`:     data parallelism whose params and optimizer state are sharded over it (ZeRO-3 / FSDP);
- `sequence`: context parallelism: each sequence is split over it, attention runs as a ring (jaxctx.ops.ring);
- `tensor`:   tensor parallelism over attention heads, MLP hidden units and the vocabulary.

Models name the axes of every parameter and activation logically ("embed", "heads", "activation_batch", ...);
`LOGICAL_RULES` maps those names to mesh axes. A batch's rows are split over (data, fsdp) together and its
length over `sequence`. Only learned position tables are split over `sequence` (their rows); checkpoints store
unsharded arrays, so they do not depend on it.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxctx.config import ConfigError, ParallelConfig

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

# Logical axis name -> mesh axis (or None = replicated). Order matters: the first rule whose mesh axis is still
# free in a given array wins, as in flax.linen.logical_to_mesh_axes.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),  # the stacked-layers axis of nn.scan
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # k/v projections; replicated instead when Hkv does not divide the axis (state.py)
    ("kv", None),
    ("mlp", "tensor"),
    ("positions", SEQUENCE_AXIS),  # learned position tables [T, D] grow with the context: split them too
    ("token_types", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", SEQUENCE_AXIS),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", None),  # GQA: Hkv may be smaller than the tensor axis; XLA gathers k/v as needed
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_shape(cfg: ParallelConfig, device_count: int) -> tuple[int, int, int, int]:
    """(data, fsdp, sequence, tensor) sizes; `data=-1` takes whatever the other axes leave. Errors name the
    numbers."""
    inner = cfg.fsdp * cfg.sequence * cfg.tensor
    if cfg.data == -1:
        if device_count % inner:
            raise ConfigError(f"parallel.fsdp={cfg.fsdp} x parallel.sequence={cfg.sequence} x parallel.tensor="
                              f"{cfg.tensor} = {inner} does not divide the {device_count} devices")
        return device_count // inner, cfg.fsdp, cfg.sequence, cfg.tensor
    shape = (cfg.data, cfg.fsdp, cfg.sequence, cfg.tensor)
    if math.prod(shape) != device_count:
        raise ConfigError(f"mesh parallel.data x fsdp x sequence x tensor = {' x '.join(map(str, shape))} = "
                          f"{math.prod(shape)} must equal the device count {device_count} (set parallel.data=-1 "
                          f"to fill the rest automatically)")
    return shape


def make_mesh(cfg: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, sequence, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU). Auto axes: shardings are
        # propagated by XLA from the constraints we place, as flax's logical partitioning expects.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_rows_per_process(mesh: Mesh) -> None:
    """Each process feeds its own rows (jaxctx.data splits documents by process), so no batch row may live on
    devices of two processes: a ConfigError when the sequence (x tensor) axes span processes."""
    if jax.process_count() == 1:
        return
    devices = np.asarray(mesh.devices)  # [data, fsdp, sequence, tensor]
    rows = devices.reshape(mesh.shape["data"] * mesh.shape["fsdp"], -1)
    for group in rows:
        owners = {d.process_index for d in group}
        if len(owners) > 1:
            raise ConfigError(f"parallel.sequence={mesh.shape[SEQUENCE_AXIS]} x parallel.tensor="
                              f"{mesh.shape['tensor']} spans processes {sorted(owners)}: a sequence split over "
                              f"hosts is not supported yet (each process feeds its own rows); keep "
                              f"parallel.sequence x parallel.tensor <= the {jax.local_device_count()} devices "
                              f"of one process")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[global_batch, seq_len] arrays: rows split over (data, fsdp), the length over `sequence` (whole if 1)."""
    return NamedSharding(mesh, P(BATCH_AXES, SEQUENCE_AXIS if sequence_size(mesh) > 1 else None))


def sequence_size(mesh) -> int:
    """Size of the mesh's `sequence` axis (1 for a mesh without one, or no mesh: an empty abstract mesh)."""
    return dict(getattr(mesh, "shape", {})).get(SEQUENCE_AXIS, 1)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for a tree whose leaves carry flax logical partitioning metadata (or none = replicated)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
