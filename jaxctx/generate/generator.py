"""`Generator`: a causal LM's params, compiled decode loops, and the batching of prompts into them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxctx.config import Config, ModelConfig
from jaxctx.generate.beam import beam_loop
from jaxctx.generate.decoder import bucket_length, left_pad, sample_loop
from jaxctx.generate.settings import GenerateError, GenerationSettings
from jaxctx.parallel import BATCH_AXES, LOGICAL_RULES, data_parallel_size, sequence_size

FINISH_REASONS = ("length", "eos", "stop")  # indexed by the loops' reason codes


@dataclass(frozen=True)
class Completion:
    """One prompt's result: the new token ids (through the end token, if any) and why the row stopped."""

    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "stop" | "length"


class Generator:
    """Decode with a gpt2 or llama model.

        gen = Generator(cfg, params)                       # params: numpy or jax arrays, the build(cfg) tree
        [c] = gen.generate([prompt_ids], GenerationSettings(max_new_tokens=20, eos_ids=(2,)))
        c.token_ids, c.finish_reason

    One jitted loop per (batch size, prompt bucket, settings.compile_key()) is compiled and kept
    (`compiled_count`): seeds, temperatures, top-k / top-p values, penalties and end ids reuse it.
    Prompts plus max_new_tokens must fit the model's positions (learned tables have no row beyond), unless
    truncate="left" keeps each prompt's last tokens that do.

    mesh (a `jaxctx.parallel.make_mesh` (data, fsdp, sequence, tensor) mesh, sequence=1): decode on it as
    training does. Params take the shardings training gives them (embed over fsdp; heads, MLP and vocab over
    tensor), the prompt batch and the KV cache are split over (data, fsdp) and the cache's kv-head axis over
    tensor (when it divides). Each batch is padded up to a multiple of data x fsdp rows.
    """

    def __init__(self, cfg: Config | ModelConfig, params, *, truncate: str = "error", mesh: Mesh | None = None):
        from jaxctx import models

        model_cfg = cfg.resolved().model if isinstance(cfg, Config) else cfg
        if model_cfg.family not in ("gpt2", "llama"):
            raise GenerateError(f"model.family={model_cfg.family!r} cannot generate: it is an encoder (masked LM); "
                                f"generate needs a gpt2 or llama model (use fill-mask for bert)")
        if truncate not in ("error", "left"):
            raise GenerateError(f"truncate={truncate!r} must be 'error' or 'left'")
        # Generation never takes gradients: no rematerialisation. And the layers run unrolled: a scanned stack
        # slices (copies) every layer's weights out of the stacked arrays on each call, which for one new token
        # costs as much again as reading them (GPT-2 6x512 on CPU: 23.5 vs 12.5 ms per token for the layers).
        if model_cfg.scan_layers:
            params = models.unstack_layers(dict(params))
        self.model_cfg = dataclasses.replace(model_cfg, remat_policy="none", remat_group_size=0, scan_layers=False)
        self.model = models.build(self.model_cfg)
        if mesh is not None and sequence_size(mesh) > 1:
            raise GenerateError(f"decoding cannot split a sequence: the mesh has sequence={sequence_size(mesh)}; "
                                f"use a mesh with sequence=1 (data, fsdp and tensor may be > 1)")
        self.mesh = mesh
        self.params = jax.device_put(params, None if mesh is None else param_shardings(self.model, mesh))
        self.truncate = truncate
        self._on_token: Callable | None = None
        self._loop = jax.jit(self._run, static_argnames=("settings", "stream"))

    @property
    def max_positions(self) -> int:
        return self.model_cfg.positions

    @property
    def compiled_count(self) -> int:
        """How many decode loops have been compiled (one per batch size, prompt bucket and settings)."""
        return self._loop._cache_size()

    @property
    def rows_multiple(self) -> int:
        """Every batch is padded to a multiple of this many rows (data x fsdp of the mesh; 1 without one)."""
        return 1 if self.mesh is None else data_parallel_size(self.mesh)

    def _mesh_context(self):
        """Under a mesh, the model's logical constraints (activation rows over (data, fsdp), heads over tensor)
        and the cache's (`decoder.shard_cache`) apply while the loop is traced."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
        return stack

    def _run(self, params, prompt, valid, knobs, *, settings: GenerationSettings, stream: bool):
        if settings.num_beams > 1:
            return beam_loop(self.model, params, prompt, valid, settings, knobs)
        return sample_loop(self.model, params, prompt, valid, settings, knobs,
                           on_token=self._emit if stream else None)

    def _emit(self, tokens):
        if self._on_token is not None:
            self._on_token(np.asarray(tokens))

    def check_prompt(self, prompt: Sequence[int], settings: GenerationSettings, where: str = "prompt") -> np.ndarray:
        """The prompt as int32 ids, truncated (truncate="left") or refused when it cannot fit the positions."""
        ids = np.asarray(prompt, np.int32).reshape(-1)
        if ids.size == 0:
            raise GenerateError(f"{where} is empty: give at least one token")
        vocab = self.model_cfg.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise GenerateError(f"{where} has token id {int(ids.max() if ids.max() >= vocab else ids.min())} "
                                f"outside the model's vocabulary [0, {vocab})")
        room = self.max_positions - settings.max_new_tokens
        if ids.size > room:
            if self.truncate == "left" and room > 0:
                return ids[-room:]
            raise GenerateError(f"{where} has {ids.size} tokens; with max_new_tokens={settings.max_new_tokens} "
                                f"that is more than model.max_positions={self.max_positions} (shorten it, lower "
                                f"max_new_tokens, or truncate the prompt's start with --truncate left)")
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, *,
                 batch_size: int | None = None, on_token: Callable | None = None) -> list[Completion]:
        """Decode every prompt (lists of token ids) -> one Completion per prompt, in order.

        Prompts run in batches of batch_size (default: all at once), rounded up to a multiple of
        `rows_multiple` under a mesh; a short batch is padded with copies of its first prompt, so every batch
        has the same shape. on_token (one prompt only) is called with each
        new token id as it is chosen, for streaming.
        """
        prompts = [self.check_prompt(p, settings, f"prompt {i}") for i, p in enumerate(prompts)]
        if not prompts:
            return []
        if on_token is not None and (len(prompts) != 1 or settings.num_beams > 1):
            raise GenerateError("streaming (on_token) needs exactly one prompt and num_beams=1")
        batch_size = batch_size or len(prompts)
        batch_size = -(-batch_size // self.rows_multiple) * self.rows_multiple
        results: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            filled = batch + [batch[0]] * (batch_size - len(batch))
            ids, valid = left_pad(filled, bucket_length(max(len(p) for p in filled)), settings.pad_id)
            if self.mesh is not None:  # rows over (data, fsdp): the loop's inputs, cache and outputs follow
                ids, valid = jax.device_put((ids, valid), NamedSharding(self.mesh, P(BATCH_AXES, None)))
            self._on_token = None if on_token is None else functools.partial(_first_row, on_token)
            try:
                with self._mesh_context():
                    tokens, lengths, reasons = jax.device_get(
                        self._loop(self.params, ids, valid, settings.knobs(), settings=settings.compile_key(),
                                   stream=on_token is not None))
            finally:
                self._on_token = None
            for row in range(len(batch)):
                results.append(Completion(tuple(int(t) for t in tokens[row, :lengths[row]]),
                                          FINISH_REASONS[int(reasons[row])]))
        return results


def param_shardings(model, mesh: Mesh):
    """The NamedShardings training gives `model`'s params on `mesh` (from their logical axis names)."""
    from jaxctx.train.state import tree_shardings

    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return tree_shardings(boxed, mesh)


def _first_row(callback: Callable, tokens: np.ndarray) -> None:
    callback(int(tokens[0]))
