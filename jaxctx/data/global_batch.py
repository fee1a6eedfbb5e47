"""Assembling the global batch from each process's local batch (multi-host training).

Every process builds only its rows (`DataIterator`, `[B_local, T]` numpy arrays); the training step wants one
`jax.Array` of shape `[B, T]` sharded over the mesh. `jax.make_array_from_process_local_data` does exactly that:
process p's rows become global rows [p*B_local, (p+1)*B_local), provided the batch sharding splits the batch
axis over processes in process order (the usual `NamedSharding(mesh, P(("data", "fsdp"), None))` on a mesh
built by `jax.make_mesh` does). On one process it is a plain (sharded) device_put.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxctx.data.errors import DataError


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """{name: [B_local, ...] numpy} -> {name: [B_local * process_count, ...] jax.Array} placed by `sharding`.

    `sharding` is one `jax.sharding.Sharding` for every array (batch axis first) or a mapping name -> Sharding.
    Every process must call this with the same keys and shapes, once per step.
    """
    import jax

    out = {}
    for name, local in local_batch.items():
        sh = sharding[name] if isinstance(sharding, Mapping) else sharding
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])  # [B, T]
        out[name] = jax.make_array_from_process_local_data(sh, local, global_shape)
    return out


def local_batch_size(global_batch: int, process_count: int) -> int:
    """Rows each process feeds: the global batch split evenly over processes."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes; "
                        f"use a multiple of {process_count}")
    return global_batch // process_count
