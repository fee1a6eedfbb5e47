"""Fixtures for the converter tests: tiny random transformers (PyTorch) models saved locally, logits both sides.

Sizes are odd on purpose (6 heads of dim 8, 3 layers, vocab 101) so a swapped axis or head order cannot pass.
Every HF parameter is perturbed after init so biases and norm weights are not the trivial 0 / 1.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOL = 1e-5  # f32 logits, ours vs transformers: measured max 8.3e-7 over these tests (was 1e-4)
VOCAB = 101

# Default tiny configs per family (HF config kwargs).
HF_CONFIGS = {
    "gpt2": dict(n_embd=48, n_head=6, n_layer=3, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    "bert": dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, vocab_size=VOCAB, intermediate_size=80,
                 max_position_embeddings=64, type_vocab_size=3),
    "llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_hidden_layers=3,
                  vocab_size=VOCAB, intermediate_size=72, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2),
}


class HF:
    """Helpers shared by the converter tests (a fixture, so test modules need no imports from here)."""

    TOL = TOL
    VOCAB = VOCAB
    CONFIGS = HF_CONFIGS

    @staticmethod
    def model(family, seed=0, **overrides):
        """A random transformers model of `family` (eval mode, f32), every parameter perturbed."""
        import torch
        import transformers as T

        config_cls, model_cls = {"gpt2": (T.GPT2Config, T.GPT2LMHeadModel),
                                 "bert": (T.BertConfig, T.BertForMaskedLM),
                                 "llama": (T.LlamaConfig, T.LlamaForCausalLM)}[family]
        torch.manual_seed(seed)
        model = model_cls(config_cls(**{**HF_CONFIGS[family], **overrides})).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model

    @staticmethod
    def save(model, path, dtype=None):
        import torch

        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        model.save_pretrained(str(path))
        return str(path)

    @staticmethod
    def load(path, family, **kwargs):
        """from_pretrained with output_loading_info; asserts nothing was missing, unexpected or mismatched."""
        import torch
        import transformers as T

        auto = T.AutoModelForMaskedLM if family == "bert" else T.AutoModelForCausalLM
        kwargs.setdefault("dtype", torch.float32)
        model, info = auto.from_pretrained(str(path), output_loading_info=True, **kwargs)
        problems = {k: v for k, v in info.items() if v}
        assert not problems, problems
        return model.eval()

    @staticmethod
    def logits(model, ids, **kwargs):
        import torch

        with torch.no_grad():
            tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
            return model(torch.as_tensor(np.asarray(ids)), **tensors).logits.float().numpy()

    _applies = {}

    @classmethod
    def ours(cls, cfg, params, ids, **kwargs):
        """Our logits; one jitted apply per model config, so equal configs and shapes compile once."""
        from jaxctx.models import build

        key = repr(cfg.model)
        if key not in cls._applies:
            cls._applies[key] = jax.jit(build(cfg).apply)
        return np.asarray(cls._applies[key]({"params": params}, np.asarray(ids), **kwargs))

    @staticmethod
    def ids(shape, seed=0):
        return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)

    @staticmethod
    def tensors(path):
        """{name: numpy array} of every safetensors file in a directory (single or sharded)."""
        from safetensors.numpy import load_file

        out = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(path, name)))
        return out

    @staticmethod
    def assert_same_tensors(a, b):
        """Bit-for-bit equality of two {name: array} dicts (names, dtypes, shapes, bytes)."""
        assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert a[name].tobytes() == b[name].tobytes(), name

    @staticmethod
    def assert_same_params(a, b, cast=None):
        """Two param trees are the same: tree structure and key paths first (a missing or extra leaf fails,
        which zip(leaves(a), leaves(b)) would ignore), then shapes, dtypes and values bit for bit (after
        `cast(a_leaf)` when given)."""
        assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
        flat_a = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(a)}
        flat_b = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(b)}
        assert sorted(flat_a) == sorted(flat_b), sorted(set(flat_a) ^ set(flat_b))
        for name, x in flat_a.items():
            x = cast(x) if cast is not None else x
            y = flat_b[name]
            assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, x.dtype, y.shape, y.dtype)
            np.testing.assert_array_equal(x, y, err_msg=name)

    @staticmethod
    def jaxctx_params(cfg, seed=0):
        """Random values on exactly the tree `build(cfg).init` makes (from its eval_shape: compiling the real init
        costs ~7 s on 2 cores, and its zero biases / unit scales would hide a swapped bias)."""
        import jax.numpy as jnp
        from flax.core import meta

        from jaxctx.models import build

        abstract = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
        rng = np.random.default_rng(seed)

        def draw(path, x):
            base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
            return (base + rng.normal(0, 0.05, x.shape)).astype(np.float32)

        return jax.tree_util.tree_map_with_path(draw, meta.unbox(abstract["params"]))


@pytest.fixture(scope="session")
def hf():
    return HF


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """saved(family) -> (torch model, directory) of the default tiny model, built once per session."""
    cache = {}

    def get(family):
        if family not in cache:
            model = HF.model(family)
            cache[family] = (model, HF.save(model, tmp_path_factory.mktemp(f"hf_{family}")))
        return cache[family]

    return get
