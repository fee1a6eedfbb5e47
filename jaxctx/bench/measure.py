"""Measurement primitives shared by every bench: compile ahead of time, read memory, time a compiled call.

Compiling ahead of time (`jax.jit(fn).lower(*abstract_args).compile()`) from `jax.ShapeDtypeStruct`s gives the
compiled program's memory analysis without allocating a single input, so a bench can decide that a
configuration would not fit and skip it before anything runs (MaxText's "AOT compile to catch OOM" habit).
Timing then calls the same compiled executable, so compile time never leaks into the measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterator

import jax

MIB = 1024 ** 2
GIB = 1024 ** 3


def sig(x: float | None, digits: int = 5) -> float | None:
    """Round to significant digits (not decimals): tiny test sizes and huge sweeps both keep their precision."""
    return None if x is None else float(f"{x:.{digits}g}")


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else sig(nbytes / MIB)


def format_bytes(n: int | float) -> str:
    """Human-readable size in binary units, precise enough to compare against a budget."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Bytes from `Compiled.memory_analysis()`; None where the backend does not report them."""

    temp_bytes: int | None  # scratch XLA allocates while the program runs (activations, score tiles, ...)
    argument_bytes: int | None  # the inputs, already resident before the call
    output_bytes: int | None  # the results, alive after the call
    alias_bytes: int | None  # outputs that reuse (donated) argument buffers, counted in both of the above

    @property
    def total_bytes(self) -> int | None:
        """Peak live bytes of one call as XLA sees it: arguments + outputs - aliased + temp."""
        parts = (self.temp_bytes, self.argument_bytes, self.output_bytes)
        if any(p is None for p in parts):
            return None
        return sum(parts) - (self.alias_bytes or 0)


def memory_of(compiled) -> CompiledMemory:
    """Read the memory analysis of a compiled executable, tolerating backends that report nothing."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # pragma: no cover - some backends/plugins raise NotImplementedError
        stats = None
    if isinstance(stats, (list, tuple)):  # older jax returned one entry per device program
        stats = stats[0] if stats else None

    def get(name: str) -> int | None:
        value = getattr(stats, name, None)
        return None if value is None else int(value)

    return CompiledMemory(temp_bytes=get("temp_size_in_bytes"), argument_bytes=get("argument_size_in_bytes"),
                          output_bytes=get("output_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"))


@dataclasses.dataclass(frozen=True)
class Compiled:
    executable: Any  # jax.stages.Compiled, callable on concrete arrays of the lowered shapes
    memory: CompiledMemory
    compile_s: float  # lower + compile wall time, reported so slow compiles are visible in sweeps


def compile_ahead(fn: Callable, *abstract_args: jax.ShapeDtypeStruct) -> Compiled:
    """jit, lower and compile `fn` for the given shapes without allocating anything."""
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*abstract_args).compile()
    return Compiled(executable, memory_of(executable), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up; the median is what benches report."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def time_call(call: Callable[[], Any], *, repeats: int, warmup: int) -> Timing:
    """Time `call()` `repeats` times after `warmup` untimed calls, waiting for the device each time.

    `jax.block_until_ready` matters: dispatch is asynchronous, so without it we would time the enqueue.
    The median (not the mean) resists the occasional stall from other processes on a shared machine.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_call needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


@contextlib.contextmanager
def profiler_trace(directory: str | os.PathLike | None) -> Iterator[None]:
    """`jax.profiler.trace` into `directory` (TensorBoard's profile plugin or Perfetto read it); no-op for None.

    Benches trace a few extra calls *after* timing, so the profiler's overhead never enters a reported number.
    """
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with jax.profiler.trace(os.fspath(directory), create_perfetto_trace=True):
        yield
