"""Device mesh, logical-axis rules and the shardings of train state and batches.

The mesh has four axes, sized by `parallel.*` in the config:
- `data`:     pure data parallelism (params replicated along it);
- `fsdp`:     data parallelism whose params and optimizer state are sharded over it (ZeRO-3 / FSDP);
- `sequence`: context parallelism: each sequence is split over it, attention runs as a ring (jaxctx.ops.ring);
- `tensor`:   tensor parallelism over attention heads, MLP hidden units and the vocabulary.

Models name the axes of every parameter and activation logically ("embed", "heads", "activation_batch", ...);
`LOGICAL_RULES` maps those names to mesh axes. A batch's rows are split over (data, fsdp) together and its
length over `sequence`. Processes whose devices hold the same rows (a sequence axis spanning hosts) form one
data group and load the same rows (`data_group`). Only learned position tables are split over `sequence` (their
rows); checkpoints store unsharded arrays, so they do not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DataGroup:
    """The share of each global batch one process loads.

    Processes whose devices hold the same batch rows form one data group and must load the same rows (each
    device then takes its sequence (x tensor) part of them). `index` in [0, count) numbers the groups by their
    first row; a group loads `batch_size / count` rows, which land on its rows of the global batch in order.
    With rows that never span processes the groups are the processes themselves.
    """

    index: int
    count: int


def data_group(mesh: Mesh, process_index: int | None = None) -> DataGroup:
    """This process's data group on `mesh` (`process_index` defaults to `jax.process_index()`).

    A ConfigError names the layouts that cannot be fed: two processes that share some batch rows but not all
    (a sequence (x tensor) group straddling the boundary between the devices of two processes, e.g. 2 processes
    of 3 devices with parallel.sequence=2), data groups holding unequal numbers of rows, and a process with no
    device in the mesh.
    """
    process_index = jax.process_index() if process_index is None else process_index
    return data_group_of_devices(np.asarray(mesh.devices), process_index)


def data_group_of_devices(devices: np.ndarray, process_index: int) -> DataGroup:
    """`data_group` for a [data, fsdp, sequence, tensor] array of devices (anything with `.process_index`)."""
    blocks = devices.reshape(devices.shape[0] * devices.shape[1], -1)  # [row blocks, sequence x tensor]
    held: dict[int, set[int]] = {}  # process -> the row blocks its devices hold
    for block, block_devices in enumerate(blocks):
        for device in block_devices:
            held.setdefault(int(device.process_index), set()).add(block)
    if process_index not in held:
        raise ConfigError(f"process {process_index} has no device in the mesh, so it would feed no batch rows; "
                          f"build the mesh over devices of every process")
    groups: list[frozenset[int]] = sorted({frozenset(b) for b in held.values()}, key=min)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a & b:
                sharing = sorted(p for p, rows in held.items() if rows in (a, b))
                raise ConfigError(
                    f"processes {sharing} share some batch rows but not all (row blocks {sorted(a)} and "
                    f"{sorted(b)} of {len(blocks)}): each parallel.sequence x parallel.tensor = "
                    f"{blocks.shape[1]} device group must lie within one process or span whole processes; "
                    f"make it divide, or be a multiple of, the devices per process")
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ConfigError(f"the processes' data groups hold unequal numbers of row blocks "
                          f"({[sorted(g) for g in groups]}), so the batch cannot be split evenly among them; "
                          f"give every process the same number of devices, in the default device order")
    return DataGroup(index=groups.index(frozenset(held[process_index])), count=len(groups))


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
