"""`train.init_from`: a new run's params from a checkpoint (fresh optimizer), for language and task models.

Language models (`lm_params`) load every array as the checkpoint has it. Both kinds may start from a checkpoint
with a shorter learned position table (gpt2/bert, `model.max_positions` raised to train at a longer context):
`train.extend_positions: tile | copy | interpolate` resizes it (jaxctx.convert.mapping.resize_positions, as
`jaxctx convert from-hf --extend-positions` does); without the key such a checkpoint is refused naming it. RoPE
models (llama) have no table: a longer context only needs `model.rope_scaling` (docs/models.md).

Task models (`task_params`): the backbone from a base (LM / MLM) checkpoint, the task head started fresh.

A task model's param tree is its family's backbone without the LM head plus `classifier` (and, for a bert
sequence task, `pooler`): jaxctx.models.heads. Starting one from a language model's checkpoint therefore:
- loads every backbone array (each must be there with the model's shape: a CheckpointError lists what is not);
- drops the checkpoint's LM-only arrays (`lm_head`, `mlm_head`, `nsp_head`) after restoring them onto one device;
- initialises the head (and a pooler the checkpoint lacks; a BertForPreTraining import brings its own) as a fresh
  model of the same seed would, and says which params it initialised in one log line.
A task checkpoint with the same head (continuing a fine-tune elsewhere) loads whole; one with another num_labels is
refused naming the classifier's shapes.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax.core import meta as flax_meta

import numpy as np

from jaxctx.checkpoint import check_params_match, load_params, params_metadata
from jaxctx.errors import CheckpointError

HEAD_PARAMS = ("classifier", "pooler")  # the task heads' top-level params (jaxctx.models.heads)
POSITION_TABLE = ("pos_embed", "embedding")  # gpt2/bert learned positions [max_positions, D]


def _flat(tree) -> dict[tuple, object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_key(path): leaf for path, leaf in leaves}


def _name(path: tuple) -> str:
    return "/".join(path)


def task_params(cfg, runner, *, log=None):
    """Params for a task model (cfg.model.task != lm) from cfg.train.init_from, placed on the runner's shardings.

    Returns the unboxed params tree; prints one line naming the params it initialised (log: a callable, default
    stderr on process 0). Raises CheckpointError when the backbone does not fit.
    """
    path = cfg.train.init_from
    step, metadata, _ = params_metadata(path)
    abstract = runner.abstract_params()
    have, want = _flat(metadata), _flat(abstract)
    resize = _position_resize(cfg, path, step, have, want)
    fresh_paths = sorted(p for p in want if p not in have)
    problems = [f"{_name(p)} missing" for p in fresh_paths if p[0] not in HEAD_PARAMS]
    problems += [f"{_name(p)} has shape {tuple(have[p].shape)} in the checkpoint, the model needs "
                 f"{tuple(want[p].shape)}" for p in sorted(want.keys() & have.keys())
                 if tuple(have[p].shape) != tuple(want[p].shape) and not (resize and p == POSITION_TABLE)]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"train.init_from={path} (step {step}) does not fit the configured "
                              f"model.task={cfg.model.task} model: {shown}. Set the model.* keys to the checkpoint's "
                              f"(num_labels must match a task checkpoint's classifier)")
    unused = sorted(p for p in have if p not in want)
    # The checkpoint's own tree: the model's arrays onto the model's shardings, its LM-only arrays onto one local
    # device, dropped right after (Orbax 0.12's StandardRestore can neither skip leaves nor restore a subtree).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = dict(want)
    if resize:
        targets[POSITION_TABLE] = _as_stored(have[POSITION_TABLE], want[POSITION_TABLE])
    target = jax.tree_util.tree_map_with_path(
        lambda p, x: targets.get(_key(p), jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)), metadata,
        is_leaf=lambda x: hasattr(x, "shape"))
    loaded, _ = load_params(path, target, step=step)
    loaded = {p: x for p, x in _flat(loaded).items() if p in want}
    if resize:
        loaded[POSITION_TABLE] = _resized(cfg, loaded[POSITION_TABLE], want[POSITION_TABLE], log)

    fresh = _fresh_params(runner, abstract, cfg.train.seed) if fresh_paths else {}
    params = jax.tree_util.tree_map_with_path(lambda p, _: loaded[_key(p)] if _key(p) in loaded else fresh[_key(p)],
                                              abstract, is_leaf=lambda x: hasattr(x, "shape"))
    (log or _log)(_summary(path, step, fresh_paths, want, len(loaded), unused))
    return params


def lm_params(cfg, runner, *, log=None):
    """Params for a language model from cfg.train.init_from, placed on the runner's shardings: every array as the
    checkpoint has it (a CheckpointError lists what does not fit), the learned position table resized when
    train.extend_positions says so."""
    path = cfg.train.init_from
    # Shapes from the checkpoint's metadata first: a wrong model is refused before anything is allocated.
    step, metadata, _ = params_metadata(path)
    abstract = runner.abstract_params()
    have, want = _flat(metadata), _flat(abstract)
    resize = _position_resize(cfg, path, step, have, want)
    if not resize:
        check_params_match(path, metadata, abstract, step=step, what="train.init_from")
        return load_params(path, abstract, step=step)[0]
    stored = _as_stored(have[POSITION_TABLE], want[POSITION_TABLE])
    as_wanted = _replace(metadata, POSITION_TABLE, want[POSITION_TABLE])  # the table checked after its resize
    check_params_match(path, as_wanted, abstract, step=step, what="train.init_from")
    params, _ = load_params(path, _replace(abstract, POSITION_TABLE, stored), step=step)
    table = _flat(params)[POSITION_TABLE]
    return _replace(params, POSITION_TABLE, _resized(cfg, table, want[POSITION_TABLE], log))


def _position_resize(cfg, path: str, step: int, have: dict, want: dict) -> bool:
    """Whether the checkpoint's position table is to be resized to the model's; refuses a mismatch the config does
    not ask to resize (naming train.extend_positions)."""
    if POSITION_TABLE not in have or POSITION_TABLE not in want:
        return False
    old, new = tuple(have[POSITION_TABLE].shape), tuple(want[POSITION_TABLE].shape)
    if old == new or old[1:] != new[1:]:  # the same, or another width (a wrong model: the shape check says so)
        return False
    if cfg.train.extend_positions is None:
        raise CheckpointError(f"train.init_from={path} (step {step}) has a learned position table of {old[0]} "
                              f"rows but model.max_positions={new[0]}: set train.extend_positions to tile, copy or "
                              f"interpolate to resize it, or model.max_positions={old[0]}")
    return True


def _as_stored(stored, wanted) -> jax.ShapeDtypeStruct:
    """The checkpoint's table shape, replicated on the model's devices (its rows need not divide the mesh)."""
    sharding = wanted.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(tuple(stored.shape), wanted.dtype, sharding=sharding)


def _resized(cfg, table: jax.Array, wanted, log) -> jax.Array:
    """[P, D] (replicated) -> [N, D] on the model's sharding, by cfg.train.extend_positions."""
    from jaxctx.convert.mapping import resize_positions

    host = np.asarray(table.addressable_data(0))  # replicated: every process holds the whole table
    rows = wanted.shape[0]
    new = resize_positions(host, rows, cfg.train.extend_positions, cfg.model.initializer_range, cfg.train.seed)
    new = new.astype(host.dtype)
    (log or _log)(f"train.init_from: position table {list(host.shape)} -> {list(new.shape)} "
                  f"(train.extend_positions={cfg.train.extend_positions})")
    return jax.make_array_from_callback(new.shape, wanted.sharding, lambda index: new[index])


def _replace(tree, path: tuple, value):
    """tree with the leaf at `path` (a _key tuple) replaced by value."""
    return jax.tree_util.tree_map_with_path(lambda p, x: value if _key(p) == path else x, tree,
                                            is_leaf=lambda x: hasattr(x, "shape"))


def _key(path) -> tuple:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _fresh_params(runner, abstract, seed: int) -> dict:
    """A fresh init of the whole model (seed train.seed) on the runner's shardings, flattened by path."""
    model = runner.model
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    def init(rng):
        return flax_meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])

    return _flat(jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed)))


def _summary(path: str, step: int, fresh: list, want: dict, loaded: int, unused: list) -> str:
    shapes = ", ".join(f"{_name(p)} {list(want[p].shape)}" for p in fresh) or "none (the checkpoint has the head)"
    skipped = sorted({p[0] for p in unused})
    tail = f"; not used: {', '.join(skipped)}" if skipped else ""
    return f"train.init_from: {loaded} arrays from {path} (step {step}); initialised fresh: {shapes}{tail}"


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
