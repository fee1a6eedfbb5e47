"""Benchmarks: time, compiled memory and achieved FLOP rate of kernels and train steps.

Modules, one job each:
  cli.py        `jaxctx bench <attention|...>` argument parsing and dispatch (no jax work at import)
  flops.py      the useful-FLOP conventions every bench reports against
  machine.py    what machine a result came from, its memory budget, and its measured matmul rate
  measure.py    ahead-of-time compile + memory analysis, and median wall-clock timing
  attention.py  the attention sweep (implementations x sequence lengths)
  report.py     stdout table, JSON, CSV and PNG writers shared by all benches

Nothing is imported here so that `jaxctx --help` stays instant; import the submodule you need.
"""
