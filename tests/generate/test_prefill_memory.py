"""A long prompt prefills in O(T) memory, and the decode loop never copies the prompt's cache. Prefill: the
compiled prefill of a tiny llama (blockwise attention, GQA) at 8K, 16K and 32K tokens, from XLA's memory analysis
(deterministic, compile only, nothing runs). Temp memory doubles with T (no [T, T] scores) and no [B, T, V] logits
exist (only the last position is projected)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxctx import config as config_lib
from jaxctx import models
from jaxctx.generate.beam import beam_loop
from jaxctx.generate.decoder import prefill, sample_loop
from jaxctx.generate.settings import GenerationSettings


def _compiled_prefill(t):
    cfg = config_lib.load("configs/tiny.yaml", ["model.family=llama", "model.attention=blockwise",
                                                "model.num_kv_heads=1", f"data.seq_len={t}"])
    model = models.build(cfg)
    params = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
                        ["params"])
    step = jax.jit(lambda p, ids, valid: prefill(model, p, ids, valid, 64))
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


def _while_bodies(hlo: str) -> dict[str, str]:
    """name -> text of every while loop body computation in an HLO module's text."""
    bodies = {}
    for name in re.findall(r"\bwhile\(.*?body=%([\w.\-]+)", hlo):
        start = hlo.index(f"\n%{name} ")
        bodies[name] = hlo[start:hlo.index("\n}", start)]
    return bodies


@pytest.mark.parametrize("beams", [1, 3])
def test_decode_loop_never_copies_the_prompt_cache(beams):
    """Per token, the decode loop reads the prompt's keys and values where prefill left them: no instruction of
    the loop body (a copy, a transpose, a re-written buffer) produces an array of a prompt cache's size. A cache
    carried through the loop and updated in place made XLA:CPU copy and transpose every layer's [B, S, Hkv, Dh]
    buffer a few times per token (4x slower decoding at a 4096-token prompt)."""
    b, p, n = 2, 512, 16
    cfg = config_lib.load("configs/tiny.yaml", ["model.family=llama", "model.num_kv_heads=1",
                                                "model.scan_layers=false", f"data.seq_len={p}"])
    model = models.build(cfg)
    params = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
                        ["params"])
    settings = GenerationSettings(max_new_tokens=n, num_beams=beams)
    loop = beam_loop if beams > 1 else sample_loop
    hlo = jax.jit(lambda prm, ids, valid, knobs: loop(model, prm, ids, valid, settings, knobs)).lower(
        params, jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b, p), jnp.bool_),
        settings.knobs()).compile().as_text()
    head_dim = cfg.model.d_model // cfg.model.num_heads
    generated = f"f32[{b * beams},1,{n},{head_dim}]"  # one layer's generated keys: the decode loop's state
    decode = [body for body in _while_bodies(hlo).values() if generated in body.split("\n", 2)[1]]
    assert decode, "no while loop carries the generated-token cache"
    prompt_size = b * beams * p * head_dim  # elements of one layer's prompt keys
    for body in decode:
        for line in body.splitlines()[2:]:
            shape = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]\S* (\w[\w-]*)\(", line)
            if shape and shape.group(2) not in ("parameter", "get-tuple-element", "bitcast"):
                assert np.prod([int(x) for x in shape.group(1).split(",")]) < prompt_size, line.strip()[:200]
