"""What machine a result came from, how much memory a bench may plan for, and its measured matmul rate.

Every bench result embeds `machine_info()` so a JSON file read months later still says where it was measured.
On CPU there is no trustworthy published peak FLOP rate (it depends on cores, clocks, SIMD width and what else
runs), so benches report the fraction of a large matmul's rate measured in the same run: "how close to the
best this machine does on dense matmul" is the honest CPU analogue of MFU. On GPUs and TPUs `device_peak` looks
the device kind up in `PEAK_TFLOPS` (vendor dense peaks) and falls back to the measured matmul for unknown kinds.
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
from jaxctx.errors import UsageError

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
            raise UsageError(f"--max-temp-gb must be a positive number of GiB, got {max_gb!r}")
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

    Returns {"n", "dtype", "median_ms", "min_ms", "gflop_per_s" (median), "best_gflop_per_s" (fastest call),
    "repeats"}; the dtype should match the bench's so a bf16 attention run is compared against bf16 matmul.
    """
    n = default_matmul_size() if n is None else n
    if not isinstance(n, int) or n <= 0:
        raise UsageError(f"matmul size must be a positive integer, got {n!r}")
    abstract = jax.ShapeDtypeStruct((n, n), jnp.dtype(dtype))
    compiled = compile_ahead(jnp.matmul, abstract, abstract).executable
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    timing = time_call(lambda: compiled(a, b), repeats=repeats, warmup=warmup)
    return {
        "n": n,
        "dtype": str(jnp.dtype(dtype)),
        "median_ms": timing.median_s * 1e3,
        "min_ms": timing.min_s * 1e3,
        "gflop_per_s": matmul_flops(n) / timing.median_s / 1e9,
        "best_gflop_per_s": matmul_flops(n) / timing.min_s / 1e9,
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------------------------------------
# Peak FLOP rates and peak memory
# ----------------------------------------------------------------------------------------------------------

# Dense (no sparsity) peak TFLOP/s per JAX device, from the vendors' data sheets. Keys are matched as substrings
# of `device.device_kind`, first match wins (so "H100 PCIe" precedes "H100"). float32 on NVIDIA tensor-core GPUs
# is the TF32 rate: JAX's default matmul precision lets XLA use TF32 for f32 dots there. TPUs have no f32 matmul
# unit (f32 dots are several bf16 passes), so f32 is compared against the bf16 peak. TPU v2/v3 expose each of a
# chip's two cores as a device, hence half the chip's number.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),  # SXM
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),  # Trillium (v6e)
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v3", {"bfloat16": 61.5, "float32": 61.5}),  # per core
    ("TPU v2", {"bfloat16": 22.5, "float32": 22.5}),  # per core
)


def known_peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's dense peak for a device kind and dtype, or None when the kind or dtype is not listed."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def device_peak(dtype: str, matmul: dict | None = None, *, backend: str | None = None,
                device_kind: str | None = None) -> dict[str, Any]:
    """The FLOP rate "fraction of peak" and MFU divide by: {"tflop_per_s", "dtype", "source"}.

    GPU/TPU: the `PEAK_TFLOPS` entry of this device kind. CPU, or a kind not in the table: the rate of the
    fastest call of the `matmul` measured in the same run (`matmul_rate(...)`), so the fraction is still
    defined; None if neither. The fastest call, not the median: a peak is what the machine can do, and on a
    shared machine the median already carries other people's load.
    """
    backend = backend or jax.default_backend()
    device_kind = device_kind or jax.devices()[0].device_kind
    if backend != "cpu":
        peak = known_peak_tflops(device_kind, dtype)
        if peak is not None:
            return {"tflop_per_s": peak, "dtype": dtype,
                    "source": f"data-sheet dense peak of {device_kind} ({dtype}), jaxctx.bench.machine.PEAK_TFLOPS"}
    if matmul is not None:
        why = "CPU: no published peak" if backend == "cpu" else f"{device_kind} not in PEAK_TFLOPS"
        rate = matmul.get("best_gflop_per_s", matmul["gflop_per_s"])
        return {"tflop_per_s": float(f"{rate / 1e3:.4g}"), "dtype": matmul["dtype"],
                "source": f"measured in this run: fastest of {matmul.get('repeats', '?')} {matmul['n']}x{matmul['n']} "
                          f"{matmul['dtype']} matmuls ({why})"}
    return {"tflop_per_s": None, "dtype": dtype, "source": f"unknown ({device_kind} not in PEAK_TFLOPS)"}


def peak_device_memory_bytes(device=None) -> int | None:
    """`memory_stats()["peak_bytes_in_use"]` of a device (default: the first), None where not reported (CPU).

    The peak covers the whole process so far (jax cannot reset it), so in a sweep it is an upper bound that only
    grows; benches run lengths in increasing order, where the row's own peak is the one that counts.
    """
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices raise or return None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
