"""Full-length output buffers that stay inside the loop that fills them.

Kernels here build their [B, T, ...] outputs by writing blocks into a zero buffer (`dynamic_update_slice` in a
`fori_loop`). A plain `jnp.zeros(shape)` depends on nothing, so when the kernel runs inside another loop (a layer
`scan`, or the rematerialised backward of one) JAX's partial evaluation and XLA's loop-invariant code motion hoist
it out of that loop: the zeros then live for the whole loop, and each iteration copies them before writing. On a
128K-token GPT-2 step that was five [T, D] arrays held through the forward pass for nothing. `zeros_like_in_loop`
ties the buffer to a value computed in the loop through an `optimization_barrier` on a scalar, so it is created
where it is used and dies with its last use; its contents are exact zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def zeros_like_in_loop(anchor: jax.Array, shape: tuple[int, ...] | None = None, dtype=None) -> jax.Array:
    """jnp.zeros(shape, dtype) (default: anchor's) that cannot be hoisted above `anchor`'s computation."""
    shape = anchor.shape if shape is None else tuple(shape)
    dtype = anchor.dtype if dtype is None else dtype
    a = anchor.reshape(-1)[0].astype(jnp.float32)  # one element: the dependence is what matters, not the value
    zero = jnp.where(jnp.isfinite(a), a * 0.0, 0.0)  # +-0 exactly; XLA folds neither the product nor the select
    return jnp.broadcast_to(zero.astype(dtype), shape)
