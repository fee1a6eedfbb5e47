"""The train step holds no copy of the optimizer state, and a sharded step's loss chunks stay sharded (XLA's
compiled program, deterministic).

The non-finite guard keeps the old state when a step is bad. Written as a select between the new and the old
state, XLA must keep both alive and copies every Adam moment of the donated state: 2x the parameter bytes of
extra temp memory, which for a learned [T, D] position table is paid per token of context. As a lax.cond the
update happens in place; what remains is the gradients plus one parameter-sized update.
"""

import os
import re

import jax

from jaxctx import config as config_lib
from jaxctx.bench.trainstep import compile_step, config_at

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_step_temp_memory_has_no_copy_of_the_adam_moments():
    # A model whose parameters dwarf its activations, so temp memory is mostly about the state.
    base = config_lib.load("configs/tiny.yaml", ["model.vocab_size=8192", "model.d_model=256", "model.num_heads=4"])
    program = compile_step(config_at(base, seq_len=64, batch=base.train.grad_accum), devices=jax.devices()[:1])
    params = program.state_bytes["params"]
    assert program.state_bytes["opt_state"] >= 2 * params * 0.99  # AdamW: mu and nu
    # measured: 2.0x params with the cond; 2.9x with the select (which copies mu and nu)
    assert program.memory.temp_bytes <= 2.2 * params, (program.memory, params)


def test_chunked_loss_keeps_the_batch_sharding_under_fsdp():
    """Each loss chunk's [B, C, V] logits stay split over the batch: a chunk sliced inside the loop carries no
    sharding, and without the model's constraints XLA contracted the fsdp-sharded head's D across devices and
    all-reduced the whole global batch's logits on every device (a [8, 64, V] buffer per device here)."""
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.yaml"), [
        "data.seq_len=256", "train.batch_size=8", "model.loss_chunk=64", "parallel.fsdp=8", "parallel.data=1",
        "model.vocab_size=4096"])
    text = compile_step(cfg, devices=jax.devices()[:8]).compiled.as_text()
    chunks = set(re.findall(r"f32\[(\d+),64,4096\]", text))
    assert chunks == {"1"}, chunks  # one sequence's chunk per device, never the global batch's
