"""Model families at tiny sizes: causality, segment isolation, padding, parameter counts, scan/remat/chunking
equivalences, kernels, dtypes, GQA and RoPE (against an independent numpy implementation)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxctx.config import Config, ConfigError, ModelConfig
from jaxctx.models import build, stack_layers, unstack_layers
from jaxctx.models.layers import apply_rope, rope_cos_sin, rope_inv_freq


# Tests check numbers, not speed: XLA's backend optimisation level 0 halves CPU compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

T = 16  # sequence length used by most tests (learned position tables have 32 rows)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def tiny(family: str, **overrides) -> ModelConfig:
    base = dict(family=family, num_layers=2, num_heads=4, d_model=32, vocab_size=64, max_positions=32,
                attention="reference", scan_layers=True)
    if family == "llama":  # GQA, head_dim != d_model / heads, untied head: the unusual cases by default
        base.update(num_kv_heads=2, head_dim=12, d_ff=48, tie_embeddings=False, rope_theta=500.0)
    base.update(overrides)
    return ModelConfig(**base)


def param_shapes(cfg: ModelConfig):
    """Boxed param shapes from jax.eval_shape: no compile, no random numbers."""
    model = build(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def init(cfg: ModelConfig, seed: int = 0):
    """(module, params) with numpy random values of the right shapes.

    Faster than model.init (whose many random-init ops take seconds to compile on CPU) and, with kernels of std
    0.2 and non-trivial norm scales and biases, more sensitive than the 0.02 init: every parameter matters.
    """
    rng = np.random.RandomState(seed)
    shapes = nn.meta.unbox(param_shapes(cfg))

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.randn(*x.shape), jnp.float32)
        return jnp.asarray((0.05 if "bias" in name else 0.2) * rng.randn(*x.shape), jnp.float32)

    return build(cfg), jax.tree_util.tree_map_with_path(fill, shapes)


_APPLY = {}


def logits_fn(model):
    """A jitted apply per module (modules are hashable), so repeated calls in a test compile once."""
    if model not in _APPLY:
        _APPLY[model] = jit(lambda p, ids, **kw: model.apply({"params": p}, ids, **kw))
    return _APPLY[model]


def tokens(seed: int, shape=(2, T), vocab=64):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def count(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------------------
# Causality, packing, padding
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_models_do_not_look_ahead(family):
    model, params = init(tiny(family))
    ids = tokens(1)
    t = 9
    changed = ids.at[:, t + 1].set((ids[:, t + 1] + 7) % 64)
    f = logits_fn(model)
    a, b = f(params, ids), f(params, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)  # the change is visible from t+1 on


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_packed_segments_are_isolated(family):
    model, params = init(tiny(family))
    f = logits_fn(model)
    split = 6  # segment 1 = tokens [0, 6), segment 2 = [6, 16)
    ids = tokens(2)
    segment_ids = jnp.where(jnp.arange(T) < split, 1, 2)[None].repeat(2, 0)
    positions = jnp.where(jnp.arange(T) < split, jnp.arange(T), jnp.arange(T) - split)[None].repeat(2, 0)
    packed = f(params, ids, segment_ids=segment_ids, positions=positions)

    other = ids.at[:, split:].set((ids[:, split:] + 5) % 64)
    packed_other = f(params, other, segment_ids=segment_ids, positions=positions)
    np.testing.assert_allclose(packed[:, :split], packed_other[:, :split], atol=1e-6)
    assert not np.allclose(packed[:, split:], packed_other[:, split:], atol=1e-4)

    # Each segment equals the same document run alone, positions starting at 0.
    alone_1 = f(params, ids[:, :split])
    alone_2 = f(params, ids[:, split:])
    np.testing.assert_allclose(packed[:, :split], alone_1, atol=2e-5)
    np.testing.assert_allclose(packed[:, split:], alone_2, atol=2e-5)


def test_bert_real_tokens_unchanged_by_padding():
    model, params = init(tiny("bert"))
    f = logits_fn(model)
    n = 11
    ids, types = tokens(3, (2, n)), tokens(4, (2, n), vocab=2)
    plain = f(params, ids, token_type_ids=types)
    pad = 5
    padded_ids = jnp.concatenate([ids, jnp.zeros((2, pad), jnp.int32)], axis=1)
    padded_types = jnp.concatenate([types, jnp.zeros((2, pad), jnp.int32)], axis=1)
    segment_ids = jnp.concatenate([jnp.ones((2, n), jnp.int32), jnp.zeros((2, pad), jnp.int32)], axis=1)
    padded = f(params, padded_ids, segment_ids=segment_ids, token_type_ids=padded_types)
    np.testing.assert_allclose(padded[:, :n], plain, atol=2e-5)
    # Without the padding segment the padding would leak in (so the test can fail).
    leaky = f(params, padded_ids, token_type_ids=padded_types)
    assert not np.allclose(leaky[:, :n], plain, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Parameter counts (closed form, per architecture)
# ----------------------------------------------------------------------------------------------------------

def test_gpt2_parameter_count():
    cfg = tiny("gpt2")
    V, P, D, L = cfg.vocab_size, cfg.max_positions, cfg.d_model, cfg.num_layers
    # wte + wpe + per layer (ln_1 2D, qkv 3D^2+3D, proj D^2+D, ln_2 2D, fc 4D^2+4D, proj 4D^2+D) + ln_f
    expected = V * D + P * D + L * (12 * D * D + 13 * D) + 2 * D
    for scan in (True, False):
        assert count(param_shapes(dataclasses.replace(cfg, scan_layers=scan))) == expected


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parameter_count(tied):
    cfg = tiny("llama", tie_embeddings=tied)
    V, D, L, H, Hkv, Dh, F = (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads,
                              cfg.dim_per_head, cfg.ff_dim)
    # embed + per layer (2 RMSNorms, q, k, v, o, gate/up/down) + final norm + untied head
    per_layer = 2 * D + D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + 3 * D * F
    expected = V * D + L * per_layer + D + (0 if tied else D * V)
    assert count(param_shapes(cfg)) == expected


def test_bert_parameter_count():
    cfg = tiny("bert")
    V, P, TV, D, L, F = cfg.vocab_size, cfg.max_positions, cfg.type_vocab_size, cfg.d_model, cfg.num_layers, cfg.ff_dim
    embeddings = V * D + P * D + TV * D + 2 * D
    per_layer = 4 * D * D + 4 * D + 2 * D + D * F + F + F * D + D + 2 * D  # attn, LN, intermediate, output, LN
    mlm_head = D * D + D + 2 * D + V  # transform dense, LayerNorm, output bias (decoder weight is tied)
    assert F == 4 * D
    assert count(param_shapes(cfg)) == embeddings + L * per_layer + mlm_head


def test_params_carry_logical_axis_names():
    boxed = param_shapes(tiny("llama"))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert boxed["layers"]["attn"]["q_kernel"].names == ("layers", "embed", "heads", "kv")
    assert boxed["layers"]["attn"]["o_kernel"].names == ("layers", "heads", "kv", "embed")
    assert boxed["layers"]["mlp"]["down_kernel"].names == ("layers", "mlp", "embed")
    assert boxed["token_embed"]["embedding"].names == ("vocab", "embed")
    assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")


def test_init_follows_hf_conventions():
    cfg = tiny("gpt2", d_model=64, num_heads=4)
    params = nn.meta.unbox(jit(build(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    layer = params["layers"]
    np.testing.assert_array_equal(layer["attn_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(layer["attn"]["q_bias"], 0.0)
    np.testing.assert_allclose(np.std(params["token_embed"]["embedding"]), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(layer["mlp"]["up_kernel"]), 0.02, rtol=0.1)
    # GPT-2 scales the residual-output projections by 1/sqrt(2L).
    np.testing.assert_allclose(np.std(layer["mlp"]["down_kernel"]), 0.02 / math.sqrt(4), rtol=0.1)
    assert not np.allclose(layer["attn"]["q_kernel"][0], layer["attn"]["q_kernel"][1])  # layers differ


# ----------------------------------------------------------------------------------------------------------
# Equivalences: scan vs loop, remat, chunking, attention kernels
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_scanned_and_unscanned_layers_agree(family):
    loop_model, loop_params = init(tiny(family, scan_layers=False), seed=3)
    scan_model, scan_params = init(tiny(family, scan_layers=True))
    stacked = stack_layers(loop_params)
    assert jax.tree.structure(stacked) == jax.tree.structure(scan_params)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scan_params)
    ids = tokens(5)
    np.testing.assert_allclose(logits_fn(scan_model)(stacked, ids), logits_fn(loop_model)(loop_params, ids),
                               atol=2e-5)
    restored = unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, restored, loop_params)


def _loss_and_grads(model, params, ids, **kw):
    targets = jnp.roll(ids, -1, axis=1)
    weights = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)

    def loss(p):
        total, n = model.apply({"params": p}, ids, targets, weights, method="loss", **kw)
        return total / n

    return jit(jax.value_and_grad(loss))(params)


def _assert_close_tree(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("family,policy,scan", [("gpt2", "full", True), ("llama", "dots_saveable", False)])
def test_remat_matches_no_remat(family, policy, scan):
    model, params = init(tiny(family, scan_layers=scan, num_layers=1 if scan else 2))
    remat_model = build(dataclasses.replace(model.cfg, remat_policy=policy))
    ids = tokens(6)
    value, grads = _loss_and_grads(model, params, ids)
    remat_value, remat_grads = _loss_and_grads(remat_model, params, ids)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    _assert_close_tree(remat_grads, grads)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_chunked_mlp_and_loss_match_unchunked(family):
    model, params = init(tiny(family, num_layers=1))  # one layer keeps the four gradient compiles cheap
    chunked = build(tiny(family, num_layers=1, mlp_chunk=5, loss_chunk=7))  # T=16: neither chunk divides it
    ids = tokens(7)
    value, grads = _loss_and_grads(model, params, ids)
    chunked_value, chunked_grads = _loss_and_grads(chunked, params, ids)
    np.testing.assert_allclose(chunked_value, value, rtol=1e-5)
    _assert_close_tree(chunked_grads, grads)
    # The loss method is the mean cross-entropy of the logits __call__ returns.
    logits = logits_fn(model)(params, ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    expected = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""
    def walk(jaxpr):
        sizes = [math.prod(getattr(v.aval, "shape", ())) for e in jaxpr.eqns for v in e.outvars]
        subs = [walk(sub) for e in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(e.params)]
        return max(sizes + subs + [0])
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_chunked_model_never_holds_full_logits_or_mlp_hidden(family):
    # Sizes chosen so [B, T, V] and [B, T, F] (16384 elements) outgrow every parameter and the per-layer
    # residuals (blockwise attention: no [B, H, T, T] scores); tracing only, nothing is compiled.
    cfg = tiny(family, vocab_size=128, attention="blockwise", attention_block_q=8, attention_block_k=8)
    ids = tokens(12, (8, T), vocab=128)
    full = 8 * T * min(cfg.vocab_size, cfg.ff_dim)

    def grad_fn(model):
        loss = lambda p: model.apply({"params": p}, ids, ids, jnp.ones(ids.shape), method="loss")[0]  # noqa: E731
        return jax.grad(loss)

    params = nn.meta.unbox(param_shapes(cfg))
    assert _largest_intermediate(grad_fn(build(cfg)), params) >= full
    chunked = build(dataclasses.replace(cfg, mlp_chunk=5, loss_chunk=7))
    assert _largest_intermediate(grad_fn(chunked), params) < full


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_blockwise_attention_impl_matches_reference(family):
    model, params = init(tiny(family))
    blockwise = build(tiny(family, attention="blockwise", attention_block_q=8, attention_block_k=8))
    n = 20  # not a multiple of the block
    ids = tokens(8, (2, n))
    segment_ids = (jnp.arange(n) >= 7).astype(jnp.int32)[None].repeat(2, 0)
    np.testing.assert_allclose(logits_fn(blockwise)(params, ids, segment_ids=segment_ids),
                               logits_fn(model)(params, ids, segment_ids=segment_ids), atol=2e-5)


# How the (data, fsdp, tensor) = (2, 2, 2) mesh splits every parameter of tiny("llama") (2 layers, 4 heads of 12,
# d_model 32, d_ff 48, vocab 64): (PartitionSpec, shard shape). Written out by hand, so a rule that silently
# replicates a parameter (or splits the wrong axis) fails here; "kv" = the k/v projections' spec for Hkv = 2.
_SPLIT = {
    "['final_norm']['scale']": (("fsdp",), (16,)),
    "['layers']['attn']['k_kernel']": ((None, "fsdp", "tensor", None), (2, 16, 1, 12)),
    "['layers']['attn']['v_kernel']": ((None, "fsdp", "tensor", None), (2, 16, 1, 12)),
    "['layers']['attn']['q_kernel']": ((None, "fsdp", "tensor", None), (2, 16, 2, 12)),
    "['layers']['attn']['o_kernel']": ((None, "tensor", None, "fsdp"), (2, 2, 12, 16)),
    "['layers']['attn_norm']['scale']": ((None, "fsdp"), (2, 16)),
    "['layers']['mlp_norm']['scale']": ((None, "fsdp"), (2, 16)),
    "['layers']['mlp']['down_kernel']": ((None, "tensor", "fsdp"), (2, 24, 16)),
    "['layers']['mlp']['gate_kernel']": ((None, "fsdp", "tensor"), (2, 16, 24)),
    "['layers']['mlp']['up_kernel']": ((None, "fsdp", "tensor"), (2, 16, 24)),
    "['lm_head']['kernel']": (("fsdp", "tensor"), (16, 32)),
    "['token_embed']['embedding']": (("tensor", "fsdp"), (32, 16)),
}


def _mesh_222():
    from jax.sharding import Mesh
    from jaxctx.parallel import MESH_AXES
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2), MESH_AXES)  # a jaxctx mesh: sequence = 1
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    return mesh


def _assert_split(sharded, want):
    from jax.sharding import PartitionSpec
    got = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(sharded)}
    assert sorted(got) == sorted(want)  # every parameter, no more, no fewer
    for name, (spec, shard) in want.items():
        x = got[name]
        assert x.sharding.spec == PartitionSpec(*spec), (name, x.sharding.spec)
        assert x.sharding.shard_shape(x.shape) == shard, name
        assert {s.data.shape for s in x.addressable_shards} == {shard}, name  # the arrays really are split


def test_llama_gqa_with_fewer_kv_heads_than_the_tensor_axis_keeps_them_replicated():
    """Hkv = 1 cannot be split over tensor = 2: the k/v projections are replicated along `tensor` (still split over
    fsdp), as jaxctx.parallel documents, and everything else is split as with Hkv = 2."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from jaxctx.train.state import tree_shardings
    shardings = tree_shardings(param_shapes(tiny("llama", num_kv_heads=1)), _mesh_222())
    want = dict(_SPLIT)
    for name in ("['layers']['attn']['k_kernel']", "['layers']['attn']['v_kernel']"):
        want[name] = ((None, "fsdp", None, None), (2, 16, 1, 12))
    got = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in
              jax.tree_util.tree_leaves_with_path(nn.meta.unbox(param_shapes(tiny("llama", num_kv_heads=1))))}
    from jax.sharding import PartitionSpec
    assert sorted(got) == sorted(want)
    for name, (spec, shard) in want.items():
        assert got[name].spec == PartitionSpec(*spec), (name, got[name].spec)
        assert got[name].shard_shape(shapes[name]) == shard, name


def test_sharded_llama_matches_single_device():
    # 8 fake CPU devices (tests/conftest.py) as a (data, fsdp, tensor) = (2, 2, 2) mesh; the shardings the training
    # state gets (jaxctx.train.state from jaxctx.parallel.LOGICAL_RULES), checked parameter by parameter, then the
    # loss and gradients against one device. Exercises the logical names on params and activations (inside scan,
    # remat and chunk maps).
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxctx.parallel import LOGICAL_RULES
    from jaxctx.train.state import tree_shardings

    mesh = _mesh_222()
    cfg = tiny("llama", mlp_chunk=5, loss_chunk=7, remat_policy="full")
    model, params = init(cfg)
    ids, targets, weights = tokens(13, (4, T)), tokens(14, (4, T)), jnp.ones((4, T))

    def loss(p, ids, targets, weights):
        total, n = model.apply({"params": p}, ids, targets, weights, method="loss")
        return total / n

    value, grads = jit(jax.value_and_grad(loss))(params, ids, targets, weights)
    sharded = jax.device_put(params, tree_shardings(param_shapes(cfg), mesh))
    _assert_split(sharded, _SPLIT)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        s_value, s_grads = jit(jax.value_and_grad(loss))(sharded, *jax.device_put((ids, targets, weights), batch))
    np.testing.assert_allclose(s_value, value, rtol=1e-5)
    assert jax.tree.structure(s_grads) == jax.tree.structure(grads)
    _assert_close_tree(s_grads, grads, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Dtypes, GQA, RoPE, construction
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_bf16_compute_returns_f32_logits(family):
    model, params = init(tiny(family))
    bf16 = build(tiny(family, dtype="bfloat16", attention="blockwise"))
    ids = tokens(9)
    out, ref = logits_fn(bf16)(params, ids), logits_fn(model)(params, ids)
    assert out.dtype == jnp.float32 and out.shape == (2, T, 64)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_allclose(out, ref, atol=0.1)  # bf16 has ~3 significant digits


def test_llama_gqa_equals_mha_with_repeated_kv_heads():
    # head_dim=12 != d_model/heads=8, 2 kv heads for 4 query heads. Query head h uses kv head h // 2 (HF
    # repeat_kv / repeat_interleave); the same model with 4 kv heads holding each kv head twice must agree.
    gqa_cfg = tiny("llama")
    assert gqa_cfg.dim_per_head != gqa_cfg.d_model // gqa_cfg.num_heads and gqa_cfg.kv_heads < gqa_cfg.num_heads
    gqa, params = init(gqa_cfg)
    assert params["layers"]["attn"]["k_kernel"].shape == (2, 32, 2, 12)
    assert params["layers"]["attn"]["q_kernel"].shape == (2, 32, 4, 12)
    mha = build(tiny("llama", num_kv_heads=4))
    repeated = jax.tree.map(lambda x: x, params)
    for name in ("k_kernel", "v_kernel"):
        repeated["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 2, axis=2)
    ids = tokens(10)
    out = logits_fn(gqa)(params, ids)
    assert out.shape == (2, T, 64)
    np.testing.assert_allclose(out, logits_fn(mha)(repeated, ids), atol=2e-5)


def _numpy_inv_freq(dim, theta, scaling):
    """Straightforward float64 RoPE frequencies, one frequency at a time."""
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / theta ** (i / dim)
        kind = (scaling or {}).get("rope_type")
        if kind == "linear":
            f /= scaling["factor"]
        elif kind == "llama3":
            old = scaling["original_max_position_embeddings"]
            lo, hi, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
            wavelen = 2 * math.pi / f
            if wavelen > old / lo:  # low frequency: fully interpolated
                f /= factor
            elif wavelen >= old / hi:  # middle band: blend
                s = (old / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / factor + s * f
        out.append(f)
    return np.array(out)


def _numpy_rope(x, positions, inv_freq):
    """Rotate pairs (i, i + Dh/2) by angle position * inv_freq[i] (the rotate-half layout)."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            angle = positions[b, t] * inv_freq  # [Dh/2]
            c, s = np.cos(angle), np.sin(angle)
            x1, x2 = x[b, t, :, :half], x[b, t, :, half:]
            out[b, t, :, :half] = x1 * c - x2 * s
            out[b, t, :, half:] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rope_matches_numpy(scaling):
    dim, theta = 32, 10000.0
    expected_freq = _numpy_inv_freq(dim, theta, scaling)
    freq = rope_inv_freq(dim, theta, scaling)
    np.testing.assert_allclose(freq, expected_freq, rtol=1e-6)
    if scaling is LLAMA3:  # all three llama3 bands occur at this size, so each branch is exercised
        ratio = expected_freq / _numpy_inv_freq(dim, theta, None)
        assert np.any(ratio == 1.0) and np.any(np.isclose(ratio, 1 / 8)) and np.any((ratio < 1) & (ratio > 1 / 8))
    x = np.random.RandomState(0).randn(2, 5, 3, dim).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 2, 0, 1]])
    out = apply_rope(jnp.asarray(x), *rope_cos_sin(jnp.asarray(positions), freq))
    np.testing.assert_allclose(out, _numpy_rope(x.astype(np.float64), positions, expected_freq), atol=2e-5)


def test_llama_uses_rope_scaling():
    cfg = tiny("llama")
    model, params = init(cfg)
    ids = tokens(11)
    scaled = build(dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    # Linear scaling by 2 at positions 2p == no scaling at positions p.
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    np.testing.assert_allclose(logits_fn(scaled)(params, ids, positions=2 * pos),
                               logits_fn(model)(params, ids, positions=pos), atol=2e-5)


def test_build_accepts_config_and_model_config():
    cfg = Config(model=tiny("gpt2", max_positions=None))
    model = build(cfg)  # max_positions resolved from data.seq_len
    assert model.cfg.max_positions == cfg.data.seq_len
    with pytest.raises(ConfigError, match="max_positions"):
        build(tiny("gpt2", max_positions=None))
    with pytest.raises(ConfigError, match="family"):
        build(tiny("gpt3"))


def test_bad_inputs_name_the_argument():
    model, params = init(tiny("gpt2"))
    with pytest.raises(ValueError, match="token_type_ids"):
        model.apply({"params": params}, tokens(0), token_type_ids=tokens(0))
    with pytest.raises(ValueError, match="max_positions"):
        model.apply({"params": params}, tokens(0, (1, 40)))
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.zeros((2, T)))
