"""Public attention entry point: input validation and kernel dispatch.

`attention(q, k, v, causal=..., segment_ids=..., impl=...)` is the one function models call. The kernel is
chosen at call time (never at import time) from `impl`:

- "reference": materialised scores in float32 (the test oracle, O(T^2) memory).
- "xla": `jax.nn.dot_product_attention` (XLA's fused pattern; O(T^2) memory on CPU).
- "blockwise": our online-softmax kernel with a flash-style custom VJP; O(T * block) memory on any backend.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
- "pallas_gpu": Pallas (Triton) flash attention, GPU only; takes segment_ids natively, so packed documents run
  in O(T) memory (cuDNN here gets a dense [B, 1, T, T] mask).
- "splash": Pallas splash attention, TPU only.
- "auto": on GPU pallas_gpu when segment_ids are given, else cudnn for bf16/f16 and blockwise for f32; splash
  on TPU when importable; blockwise otherwise. With attention dropout on, always blockwise.

Attention dropout (`dropout_rate` > 0 and a `dropout_key`) runs in reference, xla (materialised, through the
reference) and blockwise, and in the ring kernel (`jaxctx.ops.ring`); all draw the same counter-based mask
(`jaxctx.ops.dropout.attention_dropout_mask`). cudnn, pallas_gpu and splash have no such mask: asking them for
dropout raises a PlatformError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxctx.errors import PlatformError
from jaxctx.ops.blockwise import blockwise_attention, dropout_args
from jaxctx.ops.reference import reference_attention, visibility_mask

IMPLS = ("auto", "reference", "xla", "blockwise", "cudnn", "pallas_gpu", "splash")


def _validate(q, k, v, segment_ids, impl):
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"attention expects {name} of rank 4 [B, T, H, D], got shape {jnp.shape(x)}")
    if k.shape != v.shape:
        raise ValueError(f"attention expects k and v of the same shape, got k {k.shape} and v {v.shape}")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"attention expects k/v [B, T, Hkv, D] matching q [B, T, H, D] in B, T and D; "
                         f"got q {q.shape}, k {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"attention needs query heads H={h} divisible by key/value heads Hkv={k.shape[2]} "
                         f"(q {q.shape}, k {k.shape})")
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (q, k, v)):
        raise ValueError(f"attention expects floating q/k/v, got {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"attention segment_ids must be an integer array [B, T], got "
                             f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
        if segment_ids.shape != (b, t):
            raise ValueError(f"attention segment_ids must have shape [B, T] = {(b, t)}, got {segment_ids.shape}")


@functools.cache
def _pallas_gpu_importable() -> bool:
    try:
        from jax.experimental.pallas.ops.gpu import attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the jaxlib build
        return False
    return True


@functools.cache
def _splash_importable() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the jaxlib build
        return False
    return True


def resolve_impl(impl: str, dtype=None, segmented: bool = False) -> str:
    """Map "auto" to the fastest kernel for the default backend (and, on GPU, the input dtype and whether
    `segment_ids` are given)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        if segmented and _pallas_gpu_importable() and dtype in (None, jnp.bfloat16, jnp.float16, jnp.float32):
            # Packed documents: cuDNN would need a dense [B, 1, T, T] mask; the Pallas kernel compares ids.
            return "pallas_gpu"
        # cuDNN's fused kernel exists for 16-bit inputs only; f32 on GPU runs our blockwise kernel.
        return "cudnn" if dtype in (None, jnp.bfloat16, jnp.float16) else "blockwise"
    if backend == "tpu" and _splash_importable():
        return "splash"
    return "blockwise"


def attention(q, k, v, *, causal: bool = False, segment_ids=None, impl: str = "auto",
              block_q: int | None = None, block_k: int | None = None, dropout_rate: float = 0.0, dropout_key=None):
    """Scaled dot-product attention.

    Args:
      q: [B, T, H, D] queries. k, v: [B, T, Hkv, D] keys and values, H % Hkv == 0 (grouped-query attention).
      causal: a query attends only to keys at or before its position.
      segment_ids: optional int [B, T]; a query attends to a key iff their ids are equal (packed documents;
        padding is simply a segment of its own).
      impl: see the module docstring.
      block_q, block_k: block sizes for "blockwise" (None = kernel default).
      dropout_rate: attention-probability dropout in [0, 1); active only with a dropout_key (a jax PRNG key).
        The mask is a function of (key, batch row, query head, query position, key position) only.
    Returns:
      [B, T, H, D] in q's dtype.
    """
    _validate(q, k, v, segment_ids, impl)
    words, rate = dropout_args(dropout_rate, dropout_key)
    if words is not None:
        if impl == "auto":
            impl = "blockwise"  # the fused kernels have no counter-based dropout mask
        elif impl in ("cudnn", "pallas_gpu", "splash"):
            raise PlatformError(f"attention impl={impl!r} cannot apply attention dropout (rate {rate}); use "
                                f"model.attention=auto or blockwise, or model.attention_dropout=0")
    impl = resolve_impl(impl, q.dtype, segmented=segment_ids is not None)
    if impl in ("reference", "xla") and words is not None:
        # xla has no dropout of its own: the materialised reference path is the same O(T^2) computation.
        return reference_attention(q, k, v, causal=causal, segment_ids=segment_ids, dropout_rate=rate,
                                   dropout_key=words)
    if impl == "reference":
        return reference_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, causal=causal, segment_ids=segment_ids, block_q=block_q,
                                   block_k=block_k, dropout_rate=rate, dropout_key=words)
    if impl == "xla":
        return _xla_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention impl='cudnn' needs a GPU, but the default backend is "
                             f"{jax.default_backend()!r}; use impl='auto' or 'blockwise'")
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention impl='cudnn' needs bfloat16 or float16 q/k/v (cuDNN has no {q.dtype} "
                             f"fused kernel); cast them or use impl='blockwise'")
        return _cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if impl == "pallas_gpu":
        if jax.default_backend() != "gpu" or not _pallas_gpu_importable():
            raise ValueError(f"attention impl='pallas_gpu' needs a GPU with jax's Pallas GPU attention, but the "
                             f"default backend is {jax.default_backend()!r}; use impl='auto' or 'blockwise'")
        from jaxctx.ops.pallas_gpu import pallas_gpu_attention  # GPU kernel import, kept out of the CPU path
        return pallas_gpu_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    if impl == "splash":
        if jax.default_backend() != "tpu" or not _splash_importable():
            raise ValueError(f"attention impl='splash' needs a TPU with Pallas splash attention, but the default "
                             f"backend is {jax.default_backend()!r}; use impl='auto' or 'blockwise'")
        from jaxctx.ops.splash import splash_attention  # TPU-only import, kept out of the CPU path
        return splash_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    raise AssertionError(impl)  # unreachable: _validate checked impl


def _xla_attention(q, k, v, *, causal, segment_ids):
    # jax.nn.dot_product_attention takes the [B, T, N, H] layout and handles GQA itself. The segment mask is
    # [B, 1, T, T]: this path is O(T^2) by design (it is the baseline the blockwise kernel is measured against).
    mask = None if segment_ids is None else visibility_mask(q.shape[1], k.shape[1], causal=False,
                                                            segment_ids=segment_ids)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")


def _cudnn_attention(q, k, v, *, causal, segment_ids):
    # cuDNN's fused kernel takes a dense mask for arbitrary segments ([B, 1, T, T] booleans); for unpacked
    # batches (segment_ids=None) it needs no mask at all and runs in O(T) memory.
    mask = None if segment_ids is None else visibility_mask(q.shape[1], k.shape[1], causal=False,
                                                            segment_ids=segment_ids)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
