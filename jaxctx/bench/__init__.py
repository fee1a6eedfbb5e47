"""Benchmarks: time, compiled memory and achieved FLOP rate of kernels and train steps.

Modules, one job each:
  cli.py        `jaxctx bench <attention|...>` argument parsing and dispatch (no jax work at import)
  flops.py      the useful-FLOP conventions every bench reports against
  machine.py    what machine a result came from, its memory budget, and its measured matmul rate
  measure.py    ahead-of-time compile + memory analysis, and median wall-clock timing
  attention.py  the attention sweep (implementations x sequence lengths)
  trainstep.py  a config's real train step at a chosen length: AOT compile, memory, synthetic batches
  train.py      the train-step sweep (variants x sequence lengths): step time, tokens/s, MFU, memory
  hf_gpt2.py    the Hugging Face GPT2LMHeadModel (PyTorch) baseline `bench train --compare-hf` runs
  max_context.py  longest sequence within a memory budget: vanilla vs memory-efficient vs blockwise
  plan.py       `jaxctx plan`: one config's per-device memory breakdown and whether it fits
  report.py     stdout table, JSON, CSV and PNG writers shared by all benches

Nothing is imported here so that `jaxctx --help` stays instant; import the submodule you need.
"""
