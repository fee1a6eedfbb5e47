"""Rotary position embeddings (RoPE) and the context-extension scalings transformers defines.

RoPE (Su et al., 2021, arXiv:2104.09864) rotates each pair of channels (i, i + Dh/2) of q and k by the angle
position * inv_freq[i] (the rotate-half layout of HF LLaMA). `model.rope_scaling` (transformers' `rope_type` names
and fields; config.py validates them, docs/models.md describes each) changes the frequencies, and for two types
also scales cos/sin:

| rope_type | frequencies                                                                   | cos/sin times    |
|-----------|-------------------------------------------------------------------------------|------------------|
| default   | 1 / theta^(2i/Dh)                                                             | 1                |
| linear    | default / factor (position interpolation, Chen et al. 2023, arXiv:2306.15595) | 1                |
| dynamic   | default with theta grown with the current length L > max_positions (NTK-aware)| 1                |
| yarn      | per-frequency blend of default and default / factor (Peng et al. 2023,        | attention_factor |
|           | arXiv:2309.00071)                                                             |                  |
| llama3    | low frequencies / factor, high ones kept, the band between blended (Llama 3.1)| 1                |
| longrope  | default / short_factor[i], or / long_factor[i] once L > the original context  | attention_factor |
|           | (LongRoPE, Ding et al. 2024, arXiv:2402.13753; Phi-3)                         |                  |

The maths follows transformers' `modeling_rope_utils.py` and `LlamaRotaryEmbedding` (v5) so a converted
checkpoint sees the same cos/sin: every frequency is computed in float32 in the same order of operations (an
angle of 60 rad is off by 4e-6 if inv_freq is off by one float32 ulp, so the order matters), and the attention
factor multiplies cos and sin (so q.k logits scale by its square), as transformers does.

The current length L of the length-dependent types (dynamic, longrope) is max(positions) + 1 over the whole batch,
the quantity transformers' dynamic update uses; here it is a traced value, so one compiled step serves every
length. transformers' dynamic module is stateful (it keeps the largest length's frequencies until a call shorter
than max_position_embeddings resets them); ours is a pure function of each call's positions, equal to a fresh
transformers module called with them.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxctx.config import ModelConfig

F32 = np.float32


def rope_type(scaling: Mapping | None) -> str:
    """The rope_type of a scaling dict ("type" is transformers' legacy name; None or {} = "default")."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _exponents(head_dim: int) -> np.ndarray:
    """2i / Dh for i < Dh/2, float32 [Dh/2] (arange in int, then divided in float32, as transformers)."""
    return np.arange(0, head_dim, 2, dtype=np.int64).astype(F32) / F32(head_dim)


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return (F32(1.0) / (F32(theta) ** _exponents(head_dim))).astype(F32)  # [Dh/2]


def _original_context(scaling: Mapping, max_positions: int | None) -> int:
    """original_max_position_embeddings, defaulting to max_positions (transformers' standardize_rope_params)."""
    old = scaling.get("original_max_position_embeddings") or max_positions
    if old is None:
        raise ValueError(f"rope_scaling {rope_type(scaling)} needs original_max_position_embeddings "
                         f"(or model.max_positions)")
    return int(old)


def _llama3_inv_freq(inv_freq: np.ndarray, s: Mapping, max_positions: int | None) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = _original_context(s, max_positions)
    wavelen = F32(2 * math.pi) / inv_freq  # [Dh/2] tokens per turn
    # Wavelengths longer than old/low (turning less than `low` times over the old context) are interpolated by
    # `factor`; shorter than old/high kept; the band between blends the two linearly in old/wavelen.
    scaled = np.where(wavelen > old / low, inv_freq / F32(factor), inv_freq)
    smooth = (F32(old) / wavelen - F32(low)) / F32(high - low)
    smoothed = (1 - smooth) * scaled / F32(factor) + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(F32)


def _yarn_inv_freq(head_dim: int, theta: float, s: Mapping, max_positions: int | None) -> np.ndarray:
    factor = float(s["factor"])
    old = _original_context(s, max_positions)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1  # 0/None = the paper's defaults

    def correction_dim(turns):  # the (fractional) index 2i whose wavelength makes `turns` turns over `old` tokens
        return head_dim * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    # ramp [Dh/2]: 0 below index `low` (fast: keep the original frequency), 1 above `high` (slow: interpolate).
    ramp = np.clip((np.arange(head_dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1).astype(F32)
    keep = F32(1) - ramp
    wavelength_scale = F32(theta) ** _exponents(head_dim)  # theta^(2i/Dh) [Dh/2]
    extrapolated = F32(1) / wavelength_scale
    interpolated = F32(1) / (F32(factor) * wavelength_scale)
    return (interpolated * (F32(1) - keep) + extrapolated * keep).astype(F32)


def _longrope_inv_freq(head_dim: int, theta: float, factors) -> np.ndarray:
    ext = np.asarray(factors, dtype=F32)  # [Dh/2] one divisor per frequency
    return (F32(1) / (ext * (F32(theta) ** _exponents(head_dim)))).astype(F32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: Mapping | None, max_positions: int | None) -> float:
    """The factor cos and sin are multiplied by: yarn and longrope (explicit or derived from factor), else 1."""
    s, kind = scaling or {}, rope_type(scaling)
    if s.get("attention_factor") is not None and kind in ("yarn", "longrope"):
        return float(s["attention_factor"])
    if kind == "yarn":  # YaRN's sqrt(1/t) = 0.1 ln(factor) + 1; DeepSeek's mscale / mscale_all_dim ratio
        factor, m, m_all = float(s["factor"]), s.get("mscale"), s.get("mscale_all_dim")
        return _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    if kind == "longrope":
        old = _original_context(s, max_positions)
        factor = s.get("factor")
        factor = float(factor) if factor is not None else max_positions / old  # Phi-3: the context ratio
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    return 1.0


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping | None = None,
                  max_positions: int | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32 numpy) at lengths within the original context.

    That is the whole answer for default, linear, yarn and llama3; for dynamic it is the unscaled default (dynamic
    changes nothing up to max_positions) and for longrope the short factors: `rope_frequencies` adds the
    length-dependent part. max_positions is the fallback for original_max_position_embeddings.
    """
    s, kind = dict(scaling or {}), rope_type(scaling)
    inv_freq = _default_inv_freq(head_dim, theta)
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":  # dividing the frequencies by `factor` == dividing positions by it
        return (inv_freq / F32(s["factor"])).astype(F32)
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, s, max_positions)
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, s, max_positions)
    if kind == "longrope":
        return _longrope_inv_freq(head_dim, theta, s["short_factor"])
    raise ValueError(f"rope_scaling rope_type={kind!r} is not supported; use default, linear, dynamic, yarn, "
                     f"llama3 or longrope")


def _dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, context: int,
                          seq_len: jax.Array) -> jax.Array:
    """Dynamic NTK frequencies at a traced length: theta' = theta * (factor L / context - (factor - 1))^(Dh/(Dh-2)).

    L is clamped to >= context (as transformers), so theta' >= theta and the power never sees a negative base.
    g^(Dh/(Dh-2)) is taken as g * g^(2/(Dh-2)): Dh/(Dh-2) rounded to float32 would put theta' off by up to 4 ulp
    (transformers raises to the exact double exponent); the split keeps the frequencies within 2 ulp of float64.
    """
    length = jnp.maximum(seq_len, context).astype(jnp.float32)
    grown = F32(factor) * length / F32(context) - F32(factor - 1)  # float32 scalar >= 1, traced
    base = F32(theta) * (grown * grown ** F32(2 / (head_dim - 2)))
    return F32(1) / base ** jnp.asarray(_exponents(head_dim))  # [Dh/2]


def rope_frequencies(cfg: ModelConfig, seq_len: jax.Array | int | None) -> tuple[jax.Array, float]:
    """(inv_freq [Dh/2] float32, attention factor) for cfg's RoPE at current length seq_len (may be traced).

    seq_len is only read by dynamic and longrope (None = within the original context).
    """
    scaling, kind = dict(cfg.rope_scaling or {}), rope_type(cfg.rope_scaling)
    dh, theta = cfg.dim_per_head, cfg.rope_theta
    inv_freq = jnp.asarray(rope_inv_freq(dh, theta, scaling, cfg.max_positions))
    factor = attention_factor(scaling, cfg.max_positions)
    if seq_len is None:
        return inv_freq, factor
    if kind == "dynamic":  # scaling begins past max_positions (transformers' max_position_embeddings)
        context = cfg.positions
        grown = _dynamic_ntk_inv_freq(dh, theta, float(scaling["factor"]), context, seq_len)
        inv_freq = jnp.where(seq_len > context, grown, inv_freq)  # exactly the default up to the context
    elif kind == "longrope":  # one set for the whole call, chosen by its length
        long = jnp.asarray(_longrope_inv_freq(dh, theta, scaling["long_factor"]))
        inv_freq = jnp.where(seq_len > _original_context(scaling, cfg.max_positions), long, inv_freq)
    return inv_freq, factor


def rope_cos_sin(positions: jax.Array, inv_freq, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, 1, Dh] in float32 (the 1 broadcasts over heads), times `scale`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, Dh/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, Dh] (rotate-half layout)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:  # yarn / longrope: scaling cos and sin scales q and k, so every attention logit by scale^2
        cos, sin = cos * F32(scale), sin * F32(scale)
    return cos, sin


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, Dh] float32 for cfg's RoPE and scaling at positions [B, T]: one call per forward pass.

    The current length of dynamic / longrope is max(positions) + 1 (traced; the max is global under sharding).
    """
    seq_len = None
    if rope_type(cfg.rope_scaling) in ("dynamic", "longrope"):
        seq_len = jnp.max(positions).astype(jnp.int32) + 1
    inv_freq, scale = rope_frequencies(cfg, seq_len)
    return rope_cos_sin(positions, inv_freq, scale)


def rotate_half(x: jax.Array) -> jax.Array:
    """[..., Dh] -> [-x2, x1] with x1, x2 the two halves (the partner of each channel in its rotation pair)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh] rotated in float32 (HF rotates in the compute dtype; f32 is the more exact of the two)."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
