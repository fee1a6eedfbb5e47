"""Creating the train state already sharded: eval_shape -> logical shardings -> jit(init, out_shardings).

Nothing is ever materialised unsharded on one device, so a model that only fits when FSDP-sharded can start.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxctx.parallel import LOGICAL_RULES, sequence_size
from jaxctx.train.step import TrainState


def _leaf_sharding(leaf, mesh: Mesh) -> NamedSharding:
    """Sharding of one (possibly boxed) abstract leaf; a box whose names do not fit the shape is replicated.

    Optimizer states that factor a parameter (Adafactor's row/column statistics) inherit the parameter's box but
    not its rank, so their logical names cannot apply; they are small and stay replicated.
    """
    if isinstance(leaf, meta.Partitioned):
        names = leaf.names
        value = leaf.value
        if len(names) == len(value.shape):
            spec = nn.logical_to_mesh_axes(names, LOGICAL_RULES)
            # An axis that does not divide evenly over its mesh axes is replicated rather than padded.
            for dim, axes in zip(value.shape, spec):
                if axes is not None and dim % _axes_size(mesh, axes):
                    spec = P(*[None if a is axes else a for a in spec])
            return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())


def _axes_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def tree_shardings(abstract_boxed, mesh: Mesh):
    """NamedShardings for every leaf of an abstract tree carrying flax logical-partitioning boxes."""
    return jax.tree.map(lambda leaf: _leaf_sharding(leaf, mesh), abstract_boxed,
                        is_leaf=lambda x: isinstance(x, meta.Partitioned))


def make_init_fn(model, optimizer, seq_len: int, sequence: int = 1):
    """rng -> boxed TrainState (params and optimizer state still carry their logical axis names).

    The params do not depend on the length, so a short dummy batch initialises them: about 8 tokens, a multiple
    of 2 x `sequence` (the zigzag layout's chunks; seq_len is one too) when init runs with a sequence axis.
    """
    unit = 2 * sequence if sequence > 1 else 1
    length = min(seq_len, unit * -(-8 // unit))

    def init(rng):
        params = model.init(rng, jnp.zeros((1, length), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return init


def abstract_state(model, optimizer, seq_len: int, mesh: Mesh):
    """(abstract unboxed state with shardings attached, the state's shardings tree) without allocating."""
    boxed = jax.eval_shape(make_init_fn(model, optimizer, seq_len, sequence_size(mesh)), jax.random.PRNGKey(0))
    shardings = tree_shardings(boxed, mesh)
    unboxed = meta.unbox(boxed)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
    return abstract, shardings


def create_state(model, optimizer, seq_len: int, mesh: Mesh, seed: int):
    """A freshly initialised, sharded TrainState and its shardings."""
    _, shardings = abstract_state(model, optimizer, seq_len, mesh)
    init = make_init_fn(model, optimizer, seq_len, sequence_size(mesh))
    state = jax.jit(lambda rng: meta.unbox(init(rng)), out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings
