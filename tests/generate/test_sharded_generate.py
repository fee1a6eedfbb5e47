"""Decoding on the training mesh (8 fake CPU devices, data=2 x fsdp=2 x tensor=2): greedy and beam outputs equal
single-device decoding token for token (tiny gpt2 and llama with GQA), params keep training's shardings, the
prompt batch and the KV cache are split over (data, fsdp) and the cache's kv heads over tensor."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxctx.config import ModelConfig, ParallelConfig
from jaxctx.generate import GenerateError, GenerationSettings, Generator, decoder
from jaxctx.models import build
from jaxctx.parallel import LOGICAL_RULES, make_mesh

VOCAB = 64
MODELS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=VOCAB, d_model=32, num_heads=4, num_layers=2, max_positions=64,
                        scan_layers=False),
    "llama": ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2,
                         d_ff=48, max_positions=64, tie_embeddings=False, scan_layers=False),
}
MESH = ParallelConfig(data=2, fsdp=2, tensor=2)


def random_params(cfg: ModelConfig):
    """Init params with every leaf perturbed (N(0, 0.5)) so logits are far from ties: a sharded sum's different
    rounding cannot flip an argmax."""
    params = build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.meta.unbox(params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def generators():
    cache = {}

    def get(name):
        if name not in cache:
            params = jax.device_get(random_params(MODELS[name]))
            cache[name] = (Generator(MODELS[name], params), Generator(MODELS[name], params, mesh=make_mesh(MESH)))
        return cache[name]

    return get


PROMPTS = [np.random.default_rng(i).integers(3, VOCAB, n).astype(np.int32) for i, n in enumerate((5, 11, 2, 9, 7))]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 2])
def test_sharded_equals_single_device(generators, family, beams):
    single, sharded = generators(family)
    settings = GenerationSettings(max_new_tokens=8, num_beams=beams, eos_ids=(1,), pad_id=0)
    ours = sharded.generate(PROMPTS, settings)  # 5 prompts: padded up to 8 rows (a multiple of data x fsdp)
    assert ours == single.generate(PROMPTS, settings)
    assert len(ours) == len(PROMPTS) and all(len(c.token_ids) for c in ours)


def test_params_and_cache_are_sharded(generators):
    _, sharded = generators("llama")
    specs = {tuple(p.key for p in path): x.sharding.spec
             for path, x in jax.tree_util.tree_leaves_with_path(sharded.params)}
    assert any("tensor" in tuple(spec) for spec in specs.values()), specs
    assert any("fsdp" in tuple(spec) for spec in specs.values()), specs
    assert all(len(x.addressable_shards) == 8 for x in jax.tree.leaves(sharded.params))
    ids = jax.device_put(np.ones((4, 16), np.int32), jax.NamedSharding(sharded.mesh, P(("data", "fsdp"), None)))
    valid = np.ones((4, 16), bool)
    with jax.set_mesh(sharded.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        _, cache = jax.jit(lambda p, i, v: decoder.prefill(sharded.model, p, i, v, 8))(sharded.params, ids, valid)
    # [B, Hkv, S, Dh]: rows over (data, fsdp), the 2 kv heads over tensor; the prompt's 16 slots, 8 generated
    for buffers, slots in ((cache.prompt.k + cache.prompt.v, 16), (cache.k + cache.v, 8)):
        for k in buffers:
            spec = tuple(k.sharding.spec) + (None,) * (4 - len(k.sharding.spec))
            assert spec == (("data", "fsdp"), "tensor", None, None), k.sharding
            assert k.addressable_shards[0].data.shape == (1, 1, slots, 8)


def test_sequence_axis_is_refused():
    with pytest.raises(GenerateError, match="sequence=2"):
        Generator(MODELS["gpt2"], random_params(MODELS["gpt2"]), mesh=make_mesh(ParallelConfig(data=4, sequence=2)))
