"""Assembling the global batch from each process's local batch (multi-host training).

Every process builds only its data group's rows (`DataIterator`, `[B_local, T]` numpy arrays, B_local = B /
groups); the training step wants one `jax.Array` of shape `[B, T]` sharded over the mesh.
`jax.make_array_from_process_local_data` does exactly that: the local rows fill, in order, the global rows this
process's devices hold, and along the length the process's devices take their own slices of the full rows (the
local batch has the global length T). Usually every process is its own group; when a sequence axis spans
processes, the processes of one group (jaxctx.parallel.data_group) pass identical rows. On one process it is a
plain (sharded) device_put.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxctx.data.errors import DataError


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any, *,
                      groups: int | None = None) -> dict[str, Any]:
    """{name: [B_local, ...] numpy} -> {name: [B_local * groups, ...] jax.Array} placed by `sharding`.

    `sharding` is one `jax.sharding.Sharding` for every array (batch axis first) or a mapping name -> Sharding.
    `groups` is the number of data groups (default: one per process). Every process must call this with the same
    keys and shapes, once per step.
    """
    import jax

    groups = jax.process_count() if groups is None else groups
    out = {}
    for name, local in local_batch.items():
        sh = sharding[name] if isinstance(sharding, Mapping) else sharding
        global_shape = (local.shape[0] * groups, *local.shape[1:])  # [B, T]
        out[name] = jax.make_array_from_process_local_data(sh, local, global_shape)
    return out


def local_batch_size(global_batch: int, process_count: int) -> int:
    """Rows each process feeds: the global batch split evenly over processes."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes; "
                        f"use a multiple of {process_count}")
    return global_batch // process_count
