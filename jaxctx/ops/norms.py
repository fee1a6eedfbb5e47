"""LayerNorm and RMSNorm with hand-written VJPs that keep only the input and two per-row statistics.

Autodiff of a norm written in jnp keeps what its backward reads: the float32 normalised input, its product with
the scale and the row statistics broadcast to [B, T, D] -- at long T each of those is as large as an activation,
and a decoder layer has two norms. Here the forward saves x (the layer already holds it), `scale`, `bias` and the
per-row mean and 1/std ([B, T] each); the backward recomputes x_hat from them inside one fused elementwise pass:

  x_hat = (x - mean) * rstd            (RMSNorm: mean = 0, rstd = 1 / sqrt(mean(x^2) + eps))
  g     = dy * scale
  dx    = rstd * (g - mean(g) - x_hat * mean(g * x_hat))      (RMSNorm: no mean(g) term)
  dscale = sum over rows of dy * x_hat ;  dbias = sum over rows of dy

Statistics and arithmetic are float32 whatever the input dtype; the output is cast to `out_dtype`. The plain jnp
versions (`layer_norm_reference`, `rms_norm_reference`) are the oracles the tests compare values and gradients to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxctx.ops.buffers import zeros_like_in_loop


def layer_norm_reference(x, scale, bias, eps: float, out_dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # biased variance, as torch
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(out_dtype)


def rms_norm_reference(x, scale, eps: float, out_dtype):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale).astype(out_dtype)


def _row_stats(x, eps: float, centered: bool):
    """mean and 1/std over the last axis, float32, keepdims ([..., 1])."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True) if centered else jnp.zeros(x32.shape[:-1] + (1,), jnp.float32)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


def _norm_forward(x, scale, bias, eps, out_dtype, centered):
    mean, rstd = _row_stats(x, eps, centered)
    y = (x.astype(jnp.float32) - mean) * rstd * scale
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype), (mean, rstd)


def _norm_backward(x, scale, bias, mean, rstd, dy, centered):
    # Everything here is made to depend on dy by adding a zero computed from it: otherwise XLA computes x_hat (and
    # broadcasts of the statistics and the scale) as soon as the forward has -- merging them with the forward's
    # own -- and holds those [.., D] arrays until dy arrives, which is exactly what this VJP exists to avoid.
    zero = zeros_like_in_loop(dy, (), jnp.float32)
    mean, rstd, scale = mean + zero, rstd + zero, scale + zero
    x_hat = (x.astype(jnp.float32) - mean) * rstd  # [..., D], recomputed (fused into the passes below)
    dy = dy.astype(jnp.float32)
    g = dy * scale
    correction = x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True)
    if centered:
        correction = correction + jnp.mean(g, axis=-1, keepdims=True)
    dx = (rstd * (g - correction)).astype(x.dtype)
    rows = tuple(range(x.ndim - 1))
    d_scale = jnp.sum(dy * x_hat, axis=rows).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=rows).astype(bias.dtype)
    return dx, d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, eps, out_dtype, centered):
    return _norm_forward(x, scale, bias, eps, out_dtype, centered)[0]


def _norm_fwd(x, scale, bias, eps, out_dtype, centered):
    y, (mean, rstd) = _norm_forward(x, scale, bias, eps, out_dtype, centered)
    return y, (x, scale, bias, mean, rstd)


def _norm_bwd(eps, out_dtype, centered, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    return _norm_backward(x, scale, bias, mean, rstd, dy, centered)


_norm.defvjp(_norm_fwd, _norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float, out_dtype=None) -> jax.Array:
    """LayerNorm over the last axis: x [..., D], scale and bias [D] (float32). Output in out_dtype (default x's)."""
    return _norm(x, scale, bias, float(eps), jnp.dtype(out_dtype or x.dtype), True)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, out_dtype=None) -> jax.Array:
    """RMSNorm over the last axis: x [..., D], scale [D] (float32). Output in out_dtype (default x's)."""
    return _norm(x, scale, None, float(eps), jnp.dtype(out_dtype or x.dtype), False)
