"""A long prompt prefills in O(T) memory: the compiled prefill of a tiny llama (blockwise attention, GQA) at 8K,
16K and 32K tokens, from XLA's memory analysis (deterministic, compile only, nothing runs). Temp memory doubles
with T (no [T, T] scores) and no [B, T, V] logits exist (only the last position is projected)."""

import re

import jax
import jax.numpy as jnp
from flax.core import meta

from jaxctx import config as config_lib
from jaxctx import models
from jaxctx.generate.decoder import prefill


def _compiled_prefill(t):
    cfg = config_lib.load("configs/tiny.yaml", ["model.family=llama", "model.attention=blockwise",
                                                "model.num_kv_heads=1", f"data.seq_len={t}"])
    model = models.build(cfg)
    params = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
                        ["params"])
    step = jax.jit(lambda p, ids, valid: prefill(model, p, ids, valid, t + 64))
    return cfg, step.lower(params, jax.ShapeDtypeStruct((1, t), jnp.int32),
                           jax.ShapeDtypeStruct((1, t), jnp.bool_)).compile()


def test_prefill_memory_is_linear_in_the_prompt():
    temp = {}
    for t in (8192, 16384, 32768):
        cfg, compiled = _compiled_prefill(t)
        temp[t] = compiled.memory_analysis().temp_size_in_bytes
        scores = t * t * 4  # one f32 [T, T] score matrix of one head
        assert temp[t] < scores / 4, (t, temp[t], scores)
        vocab = cfg.model.vocab_size
        assert not re.search(rf"\[1,{t},{vocab}\]", compiled.as_text()), f"[B, T, V] logits at T={t}"
    print({t: f"{b / 2**20:.1f} MiB" for t, b in temp.items()})
    assert temp[16384] / temp[8192] < 2.2 and temp[32768] / temp[16384] < 2.2, temp
