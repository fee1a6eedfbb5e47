"""Zero buffers that are created where they are used, not at the start of the step.

Kernels here build their [B, T, ...] outputs and gradient accumulators by writing blocks into a zero buffer
(`dynamic_update_slice` in a `fori_loop`). A plain `jnp.zeros(shape)` depends on nothing, so XLA is free to
materialise it early -- hoisted out of an enclosing layer loop, or scheduled at the start of the step (XLA:CPU
does both) -- and it then lives through everything in between. On a 128K-token GPT-2 step that was five [T, D]
arrays held through the whole forward pass. `zeros_like_in_loop(anchor, ...)` computes the zero from one element
of `anchor` (a value produced just before the buffer is needed), so the buffer cannot exist before the anchor
does. An `optimization_barrier` does not do this on XLA:CPU (it is lowered to control edges and the broadcast
still floats up); an arithmetic dependence does. The contents are exact zeros (+-0) whatever the anchor holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def zeros_like_in_loop(anchor: jax.Array, shape: tuple[int, ...] | None = None, dtype=None) -> jax.Array:
    """jnp.zeros(shape, dtype) (default: anchor's) that cannot be hoisted above `anchor`'s computation."""
    shape = anchor.shape if shape is None else tuple(shape)
    dtype = anchor.dtype if dtype is None else dtype
    a = anchor.reshape(-1)[0].astype(jnp.float32)  # one element: the dependence is what matters, not the value
    zero = jnp.where(jnp.isfinite(a), a * 0.0, 0.0)  # +-0 exactly; XLA folds neither the product nor the select
    return jnp.broadcast_to(zero.astype(dtype), shape)
