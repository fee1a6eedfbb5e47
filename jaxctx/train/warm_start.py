"""`train.init_from` for task models: the backbone from a base (LM / MLM) checkpoint, the task head started fresh.

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

from jaxctx.checkpoint import load_params, params_metadata
from jaxctx.errors import CheckpointError

HEAD_PARAMS = ("classifier", "pooler")  # the task heads' top-level params (jaxctx.models.heads)


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
    fresh_paths = sorted(p for p in want if p not in have)
    problems = [f"{_name(p)} missing" for p in fresh_paths if p[0] not in HEAD_PARAMS]
    problems += [f"{_name(p)} has shape {tuple(have[p].shape)} in the checkpoint, the model needs "
                 f"{tuple(want[p].shape)}" for p in sorted(want.keys() & have.keys())
                 if tuple(have[p].shape) != tuple(want[p].shape)]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"train.init_from={path} (step {step}) does not fit the configured "
                              f"model.task={cfg.model.task} model: {shown}. Set the model.* keys to the checkpoint's "
                              f"(num_labels must match a task checkpoint's classifier)")
    unused = sorted(p for p in have if p not in want)
    # The checkpoint's own tree: the model's arrays onto the model's shardings, its LM-only arrays onto one local
    # device, dropped right after (Orbax 0.12's StandardRestore can neither skip leaves nor restore a subtree).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map_with_path(
        lambda p, x: want.get(_key(p), jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)), metadata,
        is_leaf=lambda x: hasattr(x, "shape"))
    loaded, _ = load_params(path, target, step=step)
    loaded = {p: x for p, x in _flat(loaded).items() if p in want}

    fresh = _fresh_params(runner, abstract, cfg.train.seed) if fresh_paths else {}
    params = jax.tree_util.tree_map_with_path(lambda p, _: loaded[_key(p)] if _key(p) in loaded else fresh[_key(p)],
                                              abstract, is_leaf=lambda x: hasattr(x, "shape"))
    (log or _log)(_summary(path, step, fresh_paths, want, len(loaded), unused))
    return params


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
