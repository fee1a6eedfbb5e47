"""Name/shape maps between HF tensors and jaxctx params, shared by the three families.

A family (hf_gpt2.py, hf_bert.py, hf_llama.py) describes its checkpoint as a list of `Rule`s: one HF tensor name,
its HF shape, the jaxctx param path(s) it becomes (unscanned layout: `layers_0/attn/q_kernel`) and a layout. The
layouts are the only weight-layout transformations there are, defined once here, both directions:

| layout    | HF tensor                             | jaxctx param(s)                      | to jaxctx             |
|-----------|---------------------------------------|--------------------------------------|-----------------------|
| same      | same values, row-major order          | e.g. norms, biases, embeddings,      | reshape               |
|           | (incl. GPT-2 Conv1D weights (in, out))| kernels [D, H, Dh] <- [D, H*Dh]      |                       |
| transpose | torch nn.Linear weight (out, in)      | kernel (in..., out...)               | W.T, then reshape     |
| split3    | GPT-2 fused c_attn [.., 3*D]          | q, k, v kernels (or biases)          | split last axis in 3, |
|           |                                       |                                      | reshape each          |

Our kernels are always (input axes..., output axes...), so `reshape` alone covers head splitting ([D, H*Dh] ->
[D, H, Dh]; o_kernel [H*Dh, D] -> [H, Dh, D]); row-major order makes head h occupy columns h*Dh..(h+1)*Dh-1, which
is how every HF attention splits heads. Every conversion is exact (transposes, reshapes, splits and concatenation
copy values), so HF -> jaxctx -> HF reproduces the tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from jaxctx.config import ModelConfig
from jaxctx.convert.errors import ConvertError, TensorMismatchError, UnsupportedModelError

LAYOUTS = ("same", "transpose", "split3")


@dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name as save_pretrained writes it
    shape: tuple[int, ...]  # its HF shape
    ours: tuple[str, ...]  # jaxctx param path(s), unscanned layout ('/'-separated); three for split3
    layout: str = "same"

    def __post_init__(self):
        assert self.layout in LAYOUTS, self.layout
        assert len(self.ours) == (3 if self.layout == "split3" else 1), self


def to_ours(rule: Rule, w: np.ndarray, our_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """One HF tensor (already float32, shape checked) -> {our path: array in our shape}."""
    if rule.layout == "same":
        return {rule.ours[0]: w.reshape(our_shapes[rule.ours[0]])}
    if rule.layout == "transpose":  # torch Linear (out, in) -> (in, out), then split the head axes
        return {rule.ours[0]: np.ascontiguousarray(w.T).reshape(our_shapes[rule.ours[0]])}
    parts = np.split(w, 3, axis=-1)  # split3: [..., 3D] -> q, k, v [..., D]
    return {path: np.ascontiguousarray(p).reshape(our_shapes[path]) for path, p in zip(rule.ours, parts)}


def to_hf(rule: Rule, flat: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of `to_ours`: our array(s) -> one HF tensor of shape rule.shape."""
    if rule.layout == "same":
        return flat[rule.ours[0]].reshape(rule.shape)
    if rule.layout == "transpose":
        return np.ascontiguousarray(flat[rule.ours[0]].reshape(rule.shape[::-1]).T)
    lead = rule.shape[:-1]  # split3: q, k, v each [..., D] -> [..., 3D]
    return np.concatenate([flat[path].reshape(*lead, -1) for path in rule.ours], axis=-1)


class HFConfig:
    """Reads one config.json, collecting every missing key and unsupported setting into one error (`done`)."""

    def __init__(self, values: dict, where: str):
        self.values, self.where, self.problems = values, where, []

    def require(self, key: str, kind: type = int):
        value = self.values.get(key)
        if value is None:
            self.problems.append(f"{key} is missing")
        elif kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            self.problems.append(f"{key}={value!r} must be a positive integer")
        elif kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            self.problems.append(f"{key}={value!r} must be a number")
        else:
            return float(value) if kind is float else value
        return 1 if kind is int else None  # placeholder so reading can go on and report every problem

    def get(self, key: str, default=None):
        value = self.values.get(key)
        return default if value is None else value

    def rate(self, key: str, default: float) -> float:
        """A dropout probability in [0, 1) (default when absent): model.dropout / model.attention_dropout."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self.problems.append(f"{key}={value!r} must be a dropout probability in [0, 1)")
            return 0.0
        return float(value)

    def expect(self, key: str, allowed: tuple, default=None) -> None:
        """A setting that changes the maths must have one of the values our model implements."""
        value = self.values.get(key, default)
        if value not in allowed:
            self.problems.append(f"{key}={value!r} is not supported (jaxctx implements "
                                 f"{' or '.join(repr(a) for a in allowed)})")

    def unsupported(self, message: str) -> None:
        self.problems.append(message)

    def done(self) -> None:
        if self.problems:
            raise UnsupportedModelError(f"{self.where}: " + "; ".join(self.problems))


# ----------------------------------------------------------------------------------------------------------
# Task models: config.json's label keys <-> model.task / num_labels / problem_type / id2label
# ----------------------------------------------------------------------------------------------------------

HF_PROBLEM = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
              "regression": "regression"}


def task_from_hf(c: HFConfig, tasks: dict[str, str]) -> dict:
    """ModelConfig task fields from config.json: the task from `architectures` (tasks: architecture -> task), the
    labels from id2label (num_labels = its length, as transformers derives it), problem_type by HF's name."""
    architectures = c.get("architectures") or []
    task = next((tasks[a] for a in architectures if a in tasks), "lm")
    if task == "lm":
        return {}
    id2label = c.get("id2label")
    num_labels = c.get("num_labels")
    if id2label is not None and not isinstance(id2label, dict):
        c.unsupported(f"id2label={id2label!r} must be a mapping of label ids to names")
        id2label = None
    if id2label:
        if num_labels is not None and num_labels != len(id2label):
            c.unsupported(f"num_labels={num_labels} but id2label names {len(id2label)} labels; they must agree")
        num_labels = len(id2label)
    elif num_labels is None:
        num_labels = 2  # transformers' default
    problem = c.get("problem_type")
    ours = {hf: name for name, hf in HF_PROBLEM.items()}
    if problem is not None and problem not in ours:
        c.unsupported(f"problem_type={problem!r} is not one of {', '.join(ours)}")
        problem = None
    return {"task": task, "num_labels": num_labels, "problem_type": ours.get(problem),
            "id2label": {str(k): v for k, v in id2label.items()} if id2label else None}


def task_to_hf(m: ModelConfig) -> dict:
    """config.json label keys of a task model (label names LABEL_i when model.id2label is unset, as transformers)."""
    if m.task == "lm":
        return {}
    names = m.id2label or tuple(f"LABEL_{i}" for i in range(m.num_labels))
    out = {"id2label": {str(i): name for i, name in enumerate(names)},
           "label2id": {name: i for i, name in enumerate(names)}}
    if m.task == "sequence_classification":
        out["problem_type"] = HF_PROBLEM[m.problem]
    return out


# ----------------------------------------------------------------------------------------------------------
# Param trees
# ----------------------------------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {'a/b/c': leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items") and not hasattr(value, "shape"):
            flat.update(flatten(dict(value), path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def model_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{param path: shape} of the unscanned model for model_cfg, from jax.eval_shape (nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from jaxctx.models import build

    cfg = dataclasses.replace(model_cfg, scan_layers=False, remat_policy="none")
    model = build(cfg)
    abstract = jax.eval_shape(lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32)), jax.random.PRNGKey(0))
    return {path: tuple(x.shape) for path, x in flatten(meta.unbox(abstract["params"])).items()}


def unscanned(params) -> dict:
    """Params in the unscanned layout (`layers_0/...`) as numpy float32, from either layout, boxed or not."""
    from flax.core import meta

    from jaxctx.models import unstack_layers

    flat = {path: np.asarray(x, dtype=np.float32) for path, x in flatten(dict(meta.unbox(params))).items()}
    tree = unflatten(flat)
    return unstack_layers(tree) if "layers" in tree else tree


def scanned(params: dict) -> dict:
    """Unscanned numpy params -> the nn.scan layout (`layers/...` with a leading [L] axis).

    Like `jaxctx.models.stack_layers`, but stacks with numpy so a large model never passes through a device.
    """
    params = dict(params)
    num_layers = sum(1 for key in params if key.startswith("layers_"))
    blocks = [flatten(params.pop(f"layers_{i}")) for i in range(num_layers)]
    params["layers"] = unflatten({path: np.stack([block[path] for block in blocks]) for path in blocks[0]})
    return params


# ----------------------------------------------------------------------------------------------------------
# Checks: every problem listed in one error
# ----------------------------------------------------------------------------------------------------------

def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_tensors(rules: list[Rule], found: dict[str, tuple[tuple[int, ...], str]], where: str,
                  float_dtypes: set[str]) -> None:
    """found: {name: (shape, safetensors dtype)}. Raises TensorMismatchError listing every missing tensor,
    unexpected tensor, wrong shape and non-float dtype."""
    expected = {rule.hf: rule.shape for rule in rules}
    missing = [f"{name} {_fmt(shape)}" for name, shape in expected.items() if name not in found]
    extra = [f"{name} {_fmt(found[name][0])}" for name in found if name not in expected]
    wrong = [f"{name} is {_fmt(found[name][0])}, expected {_fmt(shape)}" for name, shape in expected.items()
             if name in found and tuple(found[name][0]) != tuple(shape)]
    dtypes = [f"{name} has dtype {found[name][1]}, expected a float type" for name in expected
              if name in found and found[name][1] not in float_dtypes]
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", wrong),
                         ("wrong dtypes", dtypes)):
        if items:
            problems.append(f"{title} ({len(items)}): " + ", ".join(items))
    if problems:
        raise TensorMismatchError(f"{where} does not match its config.json: " + "; ".join(problems))


def check_params(expected: dict[str, tuple], flat: dict[str, np.ndarray], what: str) -> None:
    """The params given to to_hf must be exactly the tree the model builds for the config."""
    missing = [f"{p} {_fmt(s)}" for p, s in expected.items() if p not in flat]
    extra = [f"{p} {_fmt(np.shape(flat[p]))}" for p in flat if p not in expected]
    wrong = [f"{p} is {_fmt(np.shape(flat[p]))}, expected {_fmt(s)}" for p, s in expected.items()
             if p in flat and tuple(np.shape(flat[p])) != tuple(s)]
    problems = [f"{title}: {', '.join(items)}" for title, items in
                (("missing params", missing), ("unexpected params", extra), ("wrong shapes", wrong)) if items]
    if problems:
        raise TensorMismatchError(f"{what} do not match the model config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Longer context: resizing a learned position table
# ----------------------------------------------------------------------------------------------------------

EXTEND_METHODS = ("tile", "copy", "interpolate")


def resize_positions(table: np.ndarray, n: int, method: str, init_std: float, seed: int = 0) -> np.ndarray:
    """A learned position table [P, D] -> [n, D].

    - tile: row i = table[i % P] (Longformer's "copy" init: the learned local pattern repeated).
    - copy: rows 0..P-1 kept, rows P..n-1 freshly initialised N(0, init_std) (as the model's own init, fixed seed).
    - interpolate: linear interpolation along positions (row 0 and row P-1 land on rows 0 and n-1), i.e. the table
      stretched by n/P, the learned-table analogue of RoPE position interpolation.
    n < P truncates (every method keeps rows 0..n-1).
    """
    p, d = table.shape
    if n == p:
        return table
    if n < p:
        return table[:n].copy()
    if method == "tile":
        return table[np.arange(n) % p].copy()
    if method == "copy":
        fresh = np.random.default_rng(seed).normal(0.0, init_std, size=(n, d)).astype(np.float32)
        fresh[:p] = table
        return fresh
    if method == "interpolate":
        x = np.linspace(0.0, p - 1, n)
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, p - 1)
        w = (x - lo).astype(np.float32)[:, None]
        return ((1 - w) * table[lo] + w * table[hi]).astype(np.float32)
    raise ConvertError(f"extend_positions={method!r} is not one of {', '.join(EXTEND_METHODS)}")
