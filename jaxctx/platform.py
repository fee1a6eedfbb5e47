"""What this machine's JAX backend can run, checked before a run writes anything.

A platform kernel named in the config (`model.attention: cudnn` on a CPU) would otherwise fail deep inside the
first jit trace, after the workdir was set up. `check_platform(cfg)` raises a `PlatformError` naming the key,
the backend and what would work, and is called by every entry point that builds a model from a config.
"""

from __future__ import annotations

import jax

from jaxctx.errors import PlatformError

# Kernel -> (backend it needs, compute dtypes it takes or None for any). "auto" picks a kernel that runs.
_KERNEL_NEEDS = {
    "cudnn": ("gpu", ("bfloat16", "float16")),
    "pallas_gpu": ("gpu", ("bfloat16", "float16", "float32")),
    "splash": ("tpu", None),
}


def check_platform(cfg, backend: str | None = None) -> None:
    """Raise PlatformError if `cfg.model.attention` cannot run on `backend` (default: jax's default backend)."""
    impl = cfg.model.attention
    if impl not in _KERNEL_NEEDS:
        return
    needed_backend, dtypes = _KERNEL_NEEDS[impl]
    backend = backend or jax.default_backend()
    if backend != needed_backend:
        raise PlatformError(
            f"model.attention={impl} needs a {needed_backend.upper()}, but this machine's JAX backend is "
            f"{backend!r}; use model.attention=auto (picks the fastest kernel that runs here) or blockwise")
    if dtypes is not None and cfg.model.dtype not in dtypes:
        raise PlatformError(
            f"model.attention={impl} needs model.dtype in {', '.join(dtypes)} (got {cfg.model.dtype}); "
            f"set model.dtype=bfloat16 or use model.attention=blockwise")
    if impl == "splash":
        from jaxctx.ops.attention import _splash_importable

        if not _splash_importable():
            raise PlatformError("model.attention=splash needs jax's Pallas splash-attention kernel, which this "
                                "jax build lacks; use model.attention=auto or blockwise")
