"""Counter-based dropout masks: a keep/drop bit is a pure function of (key, global coordinates).

Attention dropout inside a blockwise or ring kernel cannot draw a [T, T] mask up front (that is the memory the
kernel exists to avoid), and the backward pass must drop exactly the probabilities the forward dropped. So, as
FlashAttention does (Dao et al. 2022, section 3.1: the backward regenerates the dropout mask from the saved RNG
state), every element's bit is computed where it is needed from a counter: here a hash of the key and the
element's global coordinates (batch row, query head, query position, key position). The same bits come out for
any block size, any ring step, any device split and in the materialised reference, which is what lets the tests
compare kernels bit for bit and a 1-device run equal a context-parallel one.

The hash chains the MurmurHash3 32-bit finaliser (Appleby; `fmix32`, a bijection with full avalanche) over the
coordinates: h = fmix(h ^ fmix(c_i + C_i)) for each coordinate c_i. Broadcasting makes it cheap: the chain for
(batch, head, query) is computed once per row and only the last step runs per element of a [.., bq, bk] tile.
An element is kept iff its 32-bit hash is >= round(rate * 2^32), i.e. with probability 1 - rate.

Hidden-state dropout (embeddings and residual branches) uses the same hash over (batch row, token index,
feature), with token indices in natural order, so a context-parallel (zigzag-permuted) batch drops the same
elements as an unpermuted one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Distinct odd offsets per coordinate (golden-ratio multiples), so (b=1, h=0) and (b=0, h=1) hash differently.
_OFFSETS = (0x9E3779B9, 0x7F4A7C15, 0xF39CC060, 0x5CB7A4E3)


def _fmix(x: jax.Array) -> jax.Array:
    """MurmurHash3 fmix32 on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def key_words(key) -> jax.Array:
    """A jax PRNG key (typed or raw uint32[2]) -> its two uint32 words [2]."""
    key = key if hasattr(key, "dtype") else jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"dropout key must be a jax PRNG key (uint32[2] or a typed key), got {key.dtype} "
                         f"{key.shape}")
    return key


def counter_bits(words: jax.Array, *coords: jax.Array) -> jax.Array:
    """uint32 hash of the key words [2] and integer coordinate arrays (broadcast together): one draw each."""
    h = words[0] ^ _fmix(words[1] + jnp.uint32(0x2545F491))
    for i, c in enumerate(coords):
        h = _fmix(h ^ _fmix(c.astype(jnp.uint32) + jnp.uint32(_OFFSETS[i % len(_OFFSETS)] + i // len(_OFFSETS))))
    return h


def keep_threshold(rate: float) -> jax.Array:
    """uint32 threshold t with P(bits >= t) = 1 - rate for uniform 32-bit bits."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def attention_keep_block(words, rate: float, q_pos, k_pos, batch: int, kv_heads: int, groups: int):
    """Keep mask of one score tile: bool [B, Hkv, G, bq, bk].

    q_pos [P, bq], k_pos [P, bk] global (original) token positions, P = 1 or B. The head coordinate is the query
    head h = kv_head * G + g, as in q's [B, T, H, D] layout, so GQA and MHA kernels agree with the reference.
    """
    b_idx = lax.iota(jnp.int32, batch)[:, None, None, None, None]  # [B, 1, 1, 1, 1]
    h_idx = (lax.iota(jnp.int32, kv_heads)[:, None] * groups + lax.iota(jnp.int32, groups)[None, :])
    h_idx = h_idx[None, :, :, None, None]  # [1, Hkv, G, 1, 1]
    qp = q_pos[:, None, None, :, None]  # [P, 1, 1, bq, 1]
    kp = k_pos[:, None, None, None, :]  # [P, 1, 1, 1, bk]
    return counter_bits(words, b_idx, h_idx, qp, kp) >= keep_threshold(rate)


def attention_dropout_mask(key, rate: float, batch: int, heads: int, q_positions, k_positions) -> jax.Array:
    """The attention-dropout keep mask the kernels use, materialised: bool [B, H, Tq, Tk].

    key: the `dropout_key` given to `jaxctx.ops.attention`; q_positions [Tq] / k_positions [Tk]: global token
    positions (0..T-1 for one device). True = keep (the kept probability is scaled by 1 / (1 - rate)).
    """
    q_pos = jnp.asarray(q_positions, jnp.int32).reshape(1, -1)
    k_pos = jnp.asarray(k_positions, jnp.int32).reshape(1, -1)
    keep = attention_keep_block(key_words(key), rate, q_pos, k_pos, batch, heads, 1)  # [B, H, 1, Tq, Tk]
    return keep[:, :, 0]


def hidden_dropout(x: jax.Array, key, rate: float, positions: jax.Array | None = None) -> jax.Array:
    """Inverted dropout of x [B, T, F]: zero each element with probability `rate`, scale the rest by 1/(1-rate).

    positions: the natural-order token index of each of x's T rows ([T]; None = 0..T-1), so a permuted
    (context-parallel) x drops the same elements as the unpermuted one. rate 0 returns x unchanged. The backward
    regenerates the mask from the key instead of keeping a [B, T, F] mask alive between the passes.
    """
    if rate == 0.0:
        return x
    pos = lax.iota(jnp.int32, x.shape[1]) if positions is None else jnp.asarray(positions, jnp.int32)
    return _hidden_dropout(x, key_words(key), pos, rate)


def _hidden_scale(shape, words, pos, rate: float, dtype) -> jax.Array:
    """keep / (1 - rate) for x of `shape` [B, T, F], in x's dtype."""
    b, _, f = shape
    bits = counter_bits(words, lax.iota(jnp.int32, b)[:, None, None], pos[None, :, None],
                        lax.iota(jnp.int32, f)[None, None, :])  # [B, T, F]
    return jnp.where(bits >= keep_threshold(rate), jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.zeros((), dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _hidden_dropout(x, words, pos, rate):
    return x * _hidden_scale(x.shape, words, pos, rate, x.dtype)


def _hidden_dropout_fwd(x, words, pos, rate):
    # Saves only the key, positions and x's shape (a zero-size stand-in): nothing [B, T, F].
    return _hidden_dropout(x, words, pos, rate), (words, pos, jnp.zeros((0,) + x.shape, x.dtype))


def _hidden_dropout_bwd(rate, residuals, d_y):
    words, pos, like = residuals
    return d_y * _hidden_scale(like.shape[1:], words, pos, rate, like.dtype), None, None


_hidden_dropout.defvjp(_hidden_dropout_fwd, _hidden_dropout_bwd)
