"""Building blocks shared by the model families: embeddings, norms, RoPE, attention, MLPs, the layer stack.

Conventions (every module here):
- Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`); `jaxctx.parallel` maps
  the names to mesh axes. Weights are explicit `self.param`s (no `nn.Dense`), so each kernel's shape and axis
  names are visible in one line and the HF converter can map names one to one.
- Compute happens in `cfg.dtype` (params are cast where used); norms, RoPE angles, softmax and the loss in f32.
- Main activations are constrained with logical names (`BTE`, `BTHK`, `BTF`), no-ops without a mesh.
- Dropout (cfg.dropout on embeddings and residual branches, cfg.attention_dropout on attention probabilities, at
  HF's placements) runs only when the caller passes `rngs={"dropout": key}` (the train step does, when a rate is
  > 0); every other caller (eval, generation, plan) is deterministic without a flag. Masks are counter-based
  (`jaxctx.ops.dropout`): a function of the key and natural token positions, so any mesh draws the same ones.
- Context parallelism: under a mesh whose `sequence` axis has N > 1 devices, the model's inputs are in the
  zigzag layout of `jaxctx.ops.ring` (jaxctx.train.step permutes each batch once), attention is the ring kernel
  (which masks by original position), and chunked MLPs / losses chunk within each device's T/N tokens.
- Init follows the HF conventions: normal(initializer_range) kernels and embeddings, zero biases, unit norm
  scales.

RoPE and its scalings live in `jaxctx.models.rope`; its functions are re-exported here for older imports.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxctx.config import ModelConfig
from jaxctx.models.rope import apply_rope, rope_cos_sin, rope_inv_freq, rope_tables, rotate_half  # noqa: F401
from jaxctx.ops import attention
from jaxctx.ops.buffers import zeros_like_in_loop
from jaxctx.ops.decode import cached_attention
from jaxctx.ops.dropout import hidden_dropout
from jaxctx.ops.feedforward import (blockwise_feedforward, chunked_cross_entropy, project_logits,
                                    token_cross_entropy)
from jaxctx.ops.norms import layer_norm, rms_norm
from jaxctx.models.kv_cache import DecodeCache, layer_cache
from jaxctx.ops.ring import ring_attention_in_layout, to_layout_index
from jaxctx.parallel import LOGICAL_RULES, SEQUENCE_AXIS, sequence_size

# Logical names of the main activations.
BTE = ("activation_batch", "activation_length", "activation_embed")  # residual stream [B, T, D]
BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")  # q, out [B, T, H, Dh]
# k/v [B, T, Hkv, Dh]: their own head name, because Hkv (GQA) may not divide the tensor-parallel axis.
BTKK = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
BTF = ("activation_batch", "activation_length", "activation_mlp")  # MLP hidden [B, T, F]
BTV = ("activation_batch", "activation_length", "activation_vocab")  # logits [B, T, V]

PARAM_DTYPE = jnp.float32
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def context_mesh():
    """The mesh of the enclosing `jax.set_mesh` (an empty abstract mesh outside one)."""
    return jax.sharding.get_abstract_mesh()


def context_parallel_size() -> int:
    """N of the enclosing mesh's `sequence` axis: > 1 means inputs are in the zigzag layout over N devices."""
    return sequence_size(context_mesh())


def per_sequence_shard(fn: Callable, n: int, *arrays: jax.Array):
    """fn over each device's contiguous T/N tokens: [B, T, ...] -> [N*B, T/N, ...] -> fn -> back (if an array).

    The shard axis goes first so the folded leading axis is tiled (sequence, batch) without moving data; a
    chunked op then slices inside every device's tokens at once instead of walking the global (sharded) T.
    """
    if n == 1:
        return fn(*arrays)
    b, t = arrays[0].shape[:2]

    def fold(x):  # [B, T, ...] -> [N*B, T/N, ...]
        return x.reshape(b, n, t // n, *x.shape[2:]).swapaxes(0, 1).reshape(n * b, t // n, *x.shape[2:])

    out = fn(*(fold(x) for x in arrays))
    if isinstance(out, tuple):  # reductions (sums) are order-independent
        return out
    return out.reshape(n, b, t // n, *out.shape[2:]).swapaxes(0, 1).reshape(b, t, *out.shape[2:])


def dropout_rng(module: nn.Module, rate: float) -> jax.Array | None:
    """The module's next "dropout" key when dropout is active (rate > 0 and the caller gave a "dropout" rng)."""
    if rate > 0.0 and module.has_rng("dropout"):
        return module.make_rng("dropout")
    return None


def apply_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout of activations x [B, T, D] (embeddings, residual branches); x itself when inactive.

    Under context parallelism x is in the zigzag layout: the mask follows each token's natural index, so it is
    the mask of the unsplit sequence."""
    key = dropout_rng(module, rate)
    if key is None:
        return x
    n = context_parallel_size()
    positions = None if n == 1 else jnp.asarray(to_layout_index(x.shape[1], n), jnp.int32)  # [T]
    return constrain(hidden_dropout(x, key, rate, positions), BTE)


def make_param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple) -> jax.Array:
    """A float32 parameter with logical axis names (one per dimension)."""
    assert len(axes) == len(shape), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, PARAM_DTYPE)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    return nn.with_logical_constraint(x, names)


def constrain_always(x: jax.Array, names: tuple) -> jax.Array:
    """`constrain` with jaxctx's logical rules even where the caller set none (a no-op without a mesh): for arrays
    that lose their sharding otherwise (a chunk sliced inside a loop)."""
    with nn.logical_axis_rules(LOGICAL_RULES):
        return nn.with_logical_constraint(x, names)


# ----------------------------------------------------------------------------------------------------------
# Embeddings and norms
# ----------------------------------------------------------------------------------------------------------

class Embed(nn.Module):
    """Lookup table `embedding` [num, features]; returns rows in the compute dtype."""

    num: int
    features: int
    cfg: ModelConfig
    axes: tuple = ("vocab", "embed")

    def setup(self):
        self.embedding = make_param(self, "embedding", normal(self.cfg.initializer_range),
                                    (self.num, self.features), self.axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather first, cast after: casting the whole [V, D] table every step would cost V*D work.
        return gather_rows(self.embedding, ids).astype(compute_dtype(self.cfg))  # [B, T, D]


@jax.custom_vjp
def gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]: [N, D] rows at int ids [B, T] -> [B, T, D] (out-of-range ids give NaN rows and no gradient).

    Autodiff of `jnp.take` would scatter the cotangent into a zero [N, D] array that depends on nothing, and
    XLA:CPU schedules such zeros at the start of the step: for a learned position table that is one more [T, D]
    array held through the whole forward pass. Here the zeros are made from the cotangent, so they appear when the
    backward reaches the embedding.
    """
    return jnp.take(table, ids, axis=0)


def _gather_rows_fwd(table, ids):
    return gather_rows(table, ids), (table, ids)  # the table is a parameter: kept alive anyway, no copy


def _gather_rows_bwd(residuals, d_rows):
    table, ids = residuals
    d_table = zeros_like_in_loop(d_rows, table.shape, table.dtype).at[ids].add(d_rows.astype(table.dtype),
                                                                              mode="drop")
    return d_table, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class LayerNorm(nn.Module):
    """LayerNorm in float32 (`scale`, `bias` [D]); output in the compute dtype."""

    cfg: ModelConfig

    def setup(self):
        d = self.cfg.d_model
        self.scale = make_param(self, "scale", ones, (d,), ("embed",))
        self.bias = make_param(self, "bias", zeros, (d,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.as_function()(x)

    def as_function(self) -> Callable[[jax.Array], jax.Array]:
        """The norm as a pure function of x closing over this module's params (for chunked callers)."""
        scale, bias, eps, dtype = self.scale, self.bias, self.cfg.eps, compute_dtype(self.cfg)
        # biased variance, as torch; the VJP keeps only x and per-row statistics (jaxctx.ops.norms)
        return lambda x: layer_norm(x, scale, bias, eps=eps, out_dtype=dtype)


class RMSNorm(nn.Module):
    """RMSNorm (LLaMA) in float32 (`scale` [D]); output in the compute dtype."""

    cfg: ModelConfig

    def setup(self):
        self.scale = make_param(self, "scale", ones, (self.cfg.d_model,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.as_function()(x)

    def as_function(self) -> Callable[[jax.Array], jax.Array]:
        """The norm as a pure function of x closing over this module's params (for chunked callers)."""
        scale, eps, dtype = self.scale, self.cfg.eps, compute_dtype(self.cfg)
        return lambda x: rms_norm(x, scale, eps=eps, out_dtype=dtype)


def make_norm(cfg: ModelConfig, **kwargs) -> nn.Module:
    return RMSNorm(cfg, **kwargs) if cfg.family == "llama" else LayerNorm(cfg, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with explicit projections.

    Params: q_kernel [D, H, Dh], k_kernel/v_kernel [D, Hkv, Dh], o_kernel [H, Dh, D]; with use_bias also
    q_bias [H, Dh], k_bias/v_bias [Hkv, Dh], o_bias [D]. The kernel itself is `jaxctx.ops.attention`.
    """

    cfg: ModelConfig
    use_bias: bool
    out_std: float | None = None  # std of o_kernel's init; None = initializer_range (GPT-2 scales it down)

    def setup(self):
        cfg = self.cfg
        d, h, hkv, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        init, out_init = normal(cfg.initializer_range), normal(self.out_std or cfg.initializer_range)
        self.q_kernel = make_param(self, "q_kernel", init, (d, h, dh), ("embed", "heads", "kv"))
        self.k_kernel = make_param(self, "k_kernel", init, (d, hkv, dh), ("embed", "kv_heads", "kv"))
        self.v_kernel = make_param(self, "v_kernel", init, (d, hkv, dh), ("embed", "kv_heads", "kv"))
        self.o_kernel = make_param(self, "o_kernel", out_init, (h, dh, d), ("heads", "kv", "embed"))
        if self.use_bias:
            self.q_bias = make_param(self, "q_bias", zeros, (h, dh), ("heads", "kv"))
            self.k_bias = make_param(self, "k_bias", zeros, (hkv, dh), ("kv_heads", "kv"))
            self.v_bias = make_param(self, "v_bias", zeros, (hkv, dh), ("kv_heads", "kv"))
            self.o_bias = make_param(self, "o_bias", zeros, (d,), ("embed",))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None, rope: tuple | None, cache=None):
        """x [B, T, D] -> y [B, T, D]; with a cache (`jaxctx.models.kv_cache`) -> (y, (k, v) [B, T, Hkv, Dh])."""
        cfg, dtype = self.cfg, compute_dtype(self.cfg)

        def project(kernel, bias, names):
            y = jnp.einsum("btd,dhk->bthk", x, kernel.astype(dtype))  # [B, T, H or Hkv, Dh]
            if bias is not None:
                y = y + bias.astype(dtype)
            return constrain(y, names)

        def bias(name):
            return getattr(self, name) if self.use_bias else None

        q = project(self.q_kernel, bias("q_bias"), BTHK)  # [B, T, H, Dh]
        k = project(self.k_kernel, bias("k_bias"), BTKK)  # [B, T, Hkv, Dh]
        v = project(self.v_kernel, bias("v_bias"), BTKK)  # [B, T, Hkv, Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n = context_parallel_size()
        drop_key = None if cache is not None else dropout_rng(self, cfg.attention_dropout)
        if isinstance(cache, DecodeCache):  # queries read the cache and the new keys; the caller writes them
            out = cached_attention(q, cache.prompt_k, cache.prompt_v, cache.prompt_valid, cache.k, cache.v,
                                   cache.index, k, v)  # [B, t, H, Dh]
        elif n > 1:  # tokens in zigzag layout, T split over the `sequence` axis; masks by original position
            positions = jnp.asarray(to_layout_index(q.shape[1], n), jnp.int32)  # [T]
            out = ring_attention_in_layout(q, k, v, positions, mesh=context_mesh(), axis=SEQUENCE_AXIS,
                                           causal=cfg.causal, segment_ids=segment_ids, strategy=cfg.context_parallel,
                                           block_q=cfg.attention_block_q, block_k=cfg.attention_block_k,
                                           dropout_rate=cfg.attention_dropout, dropout_key=drop_key)
        else:
            out = attention(q, k, v, causal=cfg.causal, segment_ids=segment_ids, impl=cfg.attention,
                            block_q=cfg.attention_block_q, block_k=cfg.attention_block_k,
                            dropout_rate=cfg.attention_dropout, dropout_key=drop_key)  # [B, T, H, Dh]
        out = constrain(out, BTHK)
        y = jnp.einsum("bthk,hkd->btd", out, self.o_kernel.astype(dtype))  # [B, T, D]
        if self.use_bias:
            y = y + self.o_bias.astype(dtype)
        y = constrain(y, BTE)
        return y if cache is None else (y, (k, v))


# ----------------------------------------------------------------------------------------------------------
# MLPs (run whole or in sequence chunks: cfg.mlp_chunk)
# ----------------------------------------------------------------------------------------------------------

def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)  # GPT-2 "gelu_new"


def gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)  # BERT "gelu"


def chunked_mlp(mlp: Callable, x: jax.Array, chunk: int) -> jax.Array:
    """mlp over sequence chunks (0 = whole); the chunks stay inside each device's tokens (context parallel)."""
    if chunk == 0:
        return mlp(x)
    return per_sequence_shard(lambda y: blockwise_feedforward(mlp, y, chunk=chunk), context_parallel_size(), x)


class Mlp(nn.Module):
    """Two-layer MLP with biases: down(act(up(x))). Params up_kernel [D, F], up_bias [F], down_kernel [F, D],
    down_bias [D]."""

    cfg: ModelConfig
    activation: Callable = gelu_tanh
    out_std: float | None = None  # std of down_kernel's init; None = initializer_range

    def setup(self):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.ff_dim
        self.up_kernel = make_param(self, "up_kernel", normal(cfg.initializer_range), (d, f), ("embed", "mlp"))
        self.up_bias = make_param(self, "up_bias", zeros, (f,), ("mlp",))
        self.down_kernel = make_param(self, "down_kernel", normal(self.out_std or cfg.initializer_range), (f, d),
                                      ("mlp", "embed"))
        self.down_bias = make_param(self, "down_bias", zeros, (d,), ("embed",))

    def __call__(self, x: jax.Array, norm: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """mlp(x), or mlp(norm(x)) with the (position-wise) pre-norm applied per chunk: see `SwiGluMlp`."""
        dtype = compute_dtype(self.cfg)
        # Cast once outside the (possibly chunked) function so each chunk reuses the same compute-dtype copies.
        wi, bi = self.up_kernel.astype(dtype), self.up_bias.astype(dtype)
        wo, bo = self.down_kernel.astype(dtype), self.down_bias.astype(dtype)

        def mlp(x):  # position-wise: [B, t, D] -> [B, t, D]
            if norm is not None:
                x = norm(x)
            h = constrain(self.activation(x @ wi + bi), BTF)  # [B, t, F]
            return h @ wo + bo

        return constrain(chunked_mlp(mlp, x, self.cfg.mlp_chunk), BTE)


class SwiGluMlp(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x)), no biases. Params gate_kernel, up_kernel [D, F], down_kernel [F, D]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.ff_dim
        init = normal(cfg.initializer_range)
        self.gate_kernel = make_param(self, "gate_kernel", init, (d, f), ("embed", "mlp"))
        self.up_kernel = make_param(self, "up_kernel", init, (d, f), ("embed", "mlp"))
        self.down_kernel = make_param(self, "down_kernel", init, (f, d), ("mlp", "embed"))

    def __call__(self, x: jax.Array, norm: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """mlp(x), or mlp(norm(x)) with the pre-norm applied per chunk.

        Passing the norm in (rather than its output) matters when cfg.mlp_chunk > 0: the normalised [B, T, D]
        input then never exists for the whole sequence, only chunk by chunk.
        """
        dtype = compute_dtype(self.cfg)
        wg, wu, wo = (w.astype(dtype) for w in (self.gate_kernel, self.up_kernel, self.down_kernel))

        def mlp(x):  # position-wise: [B, t, D] -> [B, t, D]
            if norm is not None:
                x = norm(x)
            h = constrain(jax.nn.silu(x @ wg) * (x @ wu), BTF)  # [B, t, F]
            return h @ wo

        return constrain(chunked_mlp(mlp, x, self.cfg.mlp_chunk), BTE)


# ----------------------------------------------------------------------------------------------------------
# Inputs and the layer stack
# ----------------------------------------------------------------------------------------------------------

def check_inputs(cfg: ModelConfig, input_ids, segment_ids, positions, token_type_ids=None,
                 learned_positions: bool = False) -> jax.Array:
    """Validate input shapes; return positions [B, T] (default arange(T) per row)."""
    if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer array [B, T], got shape {jnp.shape(input_ids)} "
                         f"dtype {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    for name, x in (("segment_ids", segment_ids), ("positions", positions), ("token_type_ids", token_type_ids)):
        if x is not None and jnp.shape(x) != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {input_ids.shape}, got {jnp.shape(x)}")
    b, t = input_ids.shape
    if positions is None:
        if learned_positions and t > cfg.positions:
            raise ValueError(f"sequence length T={t} exceeds model.max_positions={cfg.positions} (the learned "
                             f"position table of {cfg.family})")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return positions


def remat_policy(name: str) -> Any:
    """cfg.remat_policy -> a jax.checkpoint policy ("full" saves nothing); "none" is handled by the caller."""
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(f"model.remat_policy={name!r} is not a jax.checkpoint_policies attribute")
    return policy


def layer_stack(block_cls: type[nn.Module], cfg: ModelConfig) -> nn.Module | list[nn.Module]:
    """The num_layers blocks, to be assigned to `self.layers` inside a parent's setup().

    scan_layers=True: one `nn.scan` module; its params are stacked on a leading axis of size num_layers whose
    logical name is "layers" (param tree: layers/<block params> [L, ...]). scan_layers=False: a Python list, so
    the param tree is layers_0/..., layers_1/... Each block is wrapped in `nn.remat` unless remat_policy="none".
    A block is called as block(x, segment_ids, rope, cache) -> (x, kv) (the scan carry/output convention): cache
    None (training) gives kv None; a `jaxctx.models.kv_cache` mode gives the layer's keys/values, stacked [L, ...]
    by the scan, whose in_axes slice a DecodeCache's leading [L] axis per layer.
    """
    cls = block_cls
    if cfg.remat_policy != "none":
        # Under scan the loop already keeps XLA from CSE-ing the recomputation away, so prevent_cse can be off.
        cls = nn.remat(cls, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        # split_rngs dropout: each layer draws its own dropout keys.
        cls = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
        return cls(cfg)
    return [cls(cfg) for _ in range(cfg.num_layers)]


def run_layers(layers: nn.Module | list[nn.Module], x: jax.Array, segment_ids, rope, *,
               cfg: ModelConfig | None = None, block_cls: type[nn.Module] | None = None, cache=None):
    """Run the layer stack on x [B, T, D] -> x; with a cache (generation) -> (x, (k, v) [L, B, T, Hkv, Dh]).

    With cfg.remat_group_size = g > 1 (scanned layers only) the L layers run as L/g groups, each group
    rematerialised as a whole around the per-layer remat: the forward saves only the L/g group inputs, and the
    backward of a group recomputes its g layer inputs. The peak then holds L/g + g layer inputs instead of L
    (12 layers, g=4: 7 instead of 12 [B, T, D] arrays) for one more forward pass per step -- the sqrt(L)
    checkpointing of Chen et al. 2016 (arXiv:1604.06174). Parameters stay stacked [L, ...] exactly as without
    grouping; the groups are a reshape of them, so checkpoints and converters do not see the difference.
    """
    if isinstance(layers, (list, tuple)):
        kvs = []
        for i, block in enumerate(layers):
            x, kv = block(x, segment_ids, rope, layer_cache(cache, i))
            kvs.append(kv)
        return x if cache is None else (x, jax.tree.map(lambda *a: jnp.stack(a), *kvs))
    group = cfg.remat_group_size if cfg is not None else 0
    if group <= 1 or layers.is_initializing() or cache is not None:
        x, kv = layers(x, segment_ids, rope, cache)
        return x if cache is None else (x, kv)
    params = layers.variables["params"]  # stacked [L, ...] (the nn.scan module's own, traced for grads)
    # Dropout: one key per layer, scanned with its params and passed to the detached layer as its "dropout" rng.
    drop = (cfg.dropout > 0.0 or cfg.attention_dropout > 0.0) and layers.has_rng("dropout")
    stacked = (params, jax.random.split(layers.make_rng("dropout"), cfg.num_layers)) if drop else (params, None)
    groups = jax.tree.map(lambda p: p.reshape(cfg.num_layers // group, group, *p.shape[1:]), stacked)
    block = block_cls(cfg, parent=None)  # detached: applied as a pure function of one layer's params

    def one_layer(x, layer):
        layer_params, key = layer
        rngs = None if key is None else {"dropout": key}
        return block.apply({"params": layer_params}, x, segment_ids, rope, None, rngs=rngs)[0], None

    layer_fn = jax.checkpoint(one_layer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)

    def one_group(x, group_params):  # [g, ...] params
        return jax.lax.scan(layer_fn, x, group_params)[0], None

    group_fn = jax.checkpoint(one_group, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return jax.lax.scan(group_fn, x, groups)[0]


# ----------------------------------------------------------------------------------------------------------
# Output projection and loss
# ----------------------------------------------------------------------------------------------------------

def lm_logits(hidden, matrix, bias, layout) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32 logits (see jaxctx.ops.project_logits for the head layouts)."""
    return constrain(project_logits(hidden, matrix, bias, head_layout=layout), BTV)


def lm_loss(cfg: ModelConfig, hidden, matrix, bias, layout, targets, weights):
    """(loss_sum, weight_sum) from final hidden states: chunked (no [B, T, V]) when cfg.loss_chunk > 0."""
    if targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
        raise ValueError(f"targets and weights must be [B, T] = {hidden.shape[:2]}, got {targets.shape} and "
                         f"{weights.shape}")
    if cfg.loss_chunk > 0:
        parts = context_parallel_size()
        # The chunks keep the batch sharding of the residual stream (folded with the sequence shards when parts > 1,
        # where the batch axis is no longer the one the logical names describe).
        keep = {} if parts > 1 else {"constrain_hidden": lambda h: constrain_always(h, BTE),
                                     "constrain_logits": lambda z: constrain_always(z, BTV)}
        return per_sequence_shard(
            lambda h, y, w: chunked_cross_entropy(h, matrix, bias, y, w, chunk=cfg.loss_chunk, head_layout=layout,
                                                  **keep),
            parts, hidden, targets, weights)
    return token_cross_entropy(lm_logits(hidden, matrix, bias, layout), targets, weights)  # via [B, T, V] f32
