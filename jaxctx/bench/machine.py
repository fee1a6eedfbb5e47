"""What machine a result came from, how much memory a bench may plan for, and its measured matmul rate.

Every bench result embeds `machine_info()` so a JSON file read months later still says where it was measured.
On CPU there is no trustworthy published peak FLOP rate (it depends on cores, clocks, SIMD width and what else
runs), so benches report the fraction of a large matmul's rate measured in the same run: "how close to the
best this machine does on dense matmul" is the honest CPU analogue of MFU.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp

from jaxctx.bench.flops import matmul_flops
from jaxctx.bench.measure import GIB, compile_ahead, time_call

# Share of host RAM a CPU bench plans for by default: leaves room for the OS, the Python process and, on a
# shared machine, other people's jobs. Accelerators reserve their memory up front, so most of it is usable.
CPU_BUDGET_FRACTION = 0.5
DEVICE_BUDGET_FRACTION = 0.9


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_memory_bytes() -> int | None:
    """Total physical RAM; psutil when installed, else POSIX sysconf."""
    try:
        import psutil  # optional: not a jaxctx dependency
        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def usable_cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _device_memory_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices raise or return None
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def machine_info() -> dict[str, Any]:
    """Backend, devices, versions, CPU and date: recorded in every bench result."""
    devices = jax.devices()
    import jaxlib
    host_mem = host_memory_bytes()
    dev_mem = _device_memory_bytes(devices[0])
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "device_memory_gib": None if dev_mem is None else round(dev_mem / GIB, 2),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jaxlib, "__version__", "unknown"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpu_count": usable_cpu_count(),
        "host_memory_gib": None if host_mem is None else round(host_mem / GIB, 2),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        # Matmul precision changes f32 speed on accelerators (TF32/bf16 passes), so it is part of the machine.
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def memory_budget(max_gb: float | None = None) -> dict[str, Any]:
    """Bytes a single compiled program may use as temp memory, and where that number came from.

    An explicit `max_gb` wins. Otherwise: a fraction of device memory on an accelerator, a fraction of host
    RAM on CPU. Returns {"bytes": int | None, "source": str}; None bytes means "unknown, never skip".
    """
    if max_gb is not None:
        if not max_gb > 0:
            raise ValueError(f"--max-temp-gb must be a positive number of GiB, got {max_gb!r}")
        return {"bytes": int(max_gb * GIB), "source": f"--max-temp-gb {max_gb:g}"}
    device = jax.devices()[0]
    if jax.default_backend() != "cpu":
        dev_mem = _device_memory_bytes(device)
        if dev_mem is not None:
            return {"bytes": int(dev_mem * DEVICE_BUDGET_FRACTION),
                    "source": f"{DEVICE_BUDGET_FRACTION:g} x {device.device_kind} memory"}
    host_mem = host_memory_bytes()
    if host_mem is None:
        return {"bytes": None, "source": "unknown (no budget enforced)"}
    return {"bytes": int(host_mem * CPU_BUDGET_FRACTION), "source": f"{CPU_BUDGET_FRACTION:g} x host RAM"}


def default_matmul_size() -> int:
    """Large enough to reach the machine's dense-matmul plateau, small enough to take well under a second."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_rate(n: int | None = None, dtype: str = "float32", *, repeats: int = 5, warmup: int = 1) -> dict:
    """Measure an n x n @ n x n matmul's FLOP rate: the reference that "fraction of matmul rate" divides by.

    Returns {"n", "dtype", "median_ms", "gflop_per_s", "repeats"}; the dtype should match the bench's so a
    bf16 attention run is compared against bf16 matmul.
    """
    n = default_matmul_size() if n is None else n
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"matmul size must be a positive integer, got {n!r}")
    abstract = jax.ShapeDtypeStruct((n, n), jnp.dtype(dtype))
    compiled = compile_ahead(jnp.matmul, abstract, abstract).executable
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    timing = time_call(lambda: compiled(a, b), repeats=repeats, warmup=warmup)
    return {
        "n": n,
        "dtype": str(jnp.dtype(dtype)),
        "median_ms": timing.median_s * 1e3,
        "gflop_per_s": matmul_flops(n) / timing.median_s / 1e9,
        "repeats": repeats,
    }
