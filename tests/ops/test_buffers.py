"""zeros_like_in_loop: exact zeros of any shape and dtype, whatever the anchor holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.ops.buffers import zeros_like_in_loop


@pytest.mark.parametrize("first", [3.5, -2.0, np.inf, -np.inf, np.nan])
def test_zeros_are_exact_whatever_the_anchor_holds(first):
    anchor = jnp.array([first, 1.0, 2.0], jnp.float32)
    z = jax.jit(lambda a: zeros_like_in_loop(a, (4, 5), jnp.bfloat16))(anchor)
    assert z.shape == (4, 5) and z.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(z, np.float32), 0.0)
    # Accumulating into it gives exactly the added values, never NaN from the anchor.
    np.testing.assert_array_equal(zeros_like_in_loop(anchor) + jnp.arange(3.0), jnp.arange(3.0))


def test_defaults_follow_the_anchor():
    anchor = jnp.ones((2, 3), jnp.int32)
    z = zeros_like_in_loop(anchor)
    assert z.shape == (2, 3) and z.dtype == jnp.int32 and not z.any()

