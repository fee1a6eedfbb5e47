"""Orbax checkpoints: save, restore onto any mesh, latest step, params-only load.

A checkpoint directory is an Orbax `CheckpointManager` root holding one sub-directory per step with three items:
- `params`:    the model parameters (a pytree of arrays, sharded as they were in training);
- `opt_state`: the optimizer state (absent in checkpoints written by `jaxctx convert from-hf`);
- `meta`:      JSON: the resolved config, the step, the data-iterator state.
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves a
`*.orbax-checkpoint-tmp-*` directory that is never mistaken for a checkpoint; we warn about it and use the
previous complete step.

A complete step can still fail to restore (files truncated or garbled on disk, an item missing):
`restore_newest` then warns naming the step and the reason and falls back to the newest step that does restore;
`quarantine` moves the bad step out of Orbax's sight (never deleting it) so training can save that step again.
Read-only loads (`load_params`, for `train.init_from` and `jaxctx convert to-hf`) raise a `CheckpointError`
naming the path and the step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxctx import storage
from jaxctx.errors import CheckpointError, UserFileNotFoundError, WriteError

ITEMS = ("params", "opt_state", "meta")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """A checkpoint root from either a checkpoint root or a training workdir (which has `checkpoints/`).

    Local paths and gs:// URLs alike (a GCS "directory" is a prefix with objects under it).
    """
    path = storage.absolute(path)
    if not storage.isdir(path):
        if not storage.exists(path):
            raise UserFileNotFoundError(f"checkpoint path {path} does not exist")
        raise CheckpointError(f"checkpoint path {path} is a file; give a checkpoint directory or a training "
                              f"workdir")
    sub = storage.join(path, "checkpoints")
    return sub if storage.isdir(sub) else path


def describe_failure(err: BaseException) -> str:
    """One line saying why a restore failed (Orbax/TensorStore messages run over many lines)."""
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def quarantine(directory: str, step: int) -> str:
    """Move `directory/<step>` to `<directory>.unrestorable/<step>` (kept for the user, invisible to Orbax)."""
    target_root = storage.absolute(directory) + ".unrestorable"
    target = storage.join(target_root, str(step))
    n = 2
    while storage.exists(target):
        target = storage.join(target_root, f"{step}-{n}")
        n += 1
    try:
        storage.makedirs(target_root)
        storage.move_tree(storage.join(directory, str(step)), target)
    except OSError as err:
        raise WriteError(f"could not move the unrestorable checkpoint {directory}/{step} aside to {target}: "
                         f"{err}") from None
    return target


def _warn_incomplete(directory: str) -> None:
    leftovers = [name for name in storage.listdir(directory) if "orbax-checkpoint-tmp" in name]
    if leftovers:
        warnings.warn(f"{directory}: skipping incomplete checkpoint(s) {', '.join(leftovers)} (a save was "
                      f"interrupted); using the latest complete step", stacklevel=3)


class Checkpointer:
    """Async, keep-N checkpoint manager for (params, opt_state, meta)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = storage.absolute(directory)
        if storage.is_url(self.directory):  # before TensorStore's first transfer: predict/evaluate/convert too
            storage.set_tensorstore_timeouts()
        _quiet_failed_write_noise()
        if not read_only:
            storage.makedirs(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=False)
        # Handlers named per item (rather than item_names) so item_metadata() can read the params' shapes
        # without restoring them (train.init_from is checked against the model before anything is loaded).
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step of the async save in flight, if any

    # -- queries ---------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        _warn_incomplete(self.directory)
        steps = self.steps()
        return steps[-1] if steps else None

    def restore_newest(self, restore: Callable[[int], Any]) -> tuple[int | None, Any, list[tuple[int, str]]]:
        """Call `restore(step)` from the newest step down until one succeeds.

        Returns (step, restore's result, [(bad step, reason), ...] newer than it); (None, None, bad) if the
        directory has no steps. Every failure is warned about, naming the step and the reason. If steps exist
        but none restores, raises CheckpointError listing each step's reason.
        """
        _warn_incomplete(self.directory)
        bad: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                return step, restore(step), bad
            except Exception as err:  # corrupt files raise JSON, TensorStore, KeyError, ValueError, ... errors
                reason = describe_failure(err)
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be restored ({reason}); "
                              f"trying the previous step", stacklevel=2)
                bad.append((step, reason))
        if bad:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in bad)
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({listed}); the files are "
                                  f"left as they are: move the directory away to start afresh")
        return None, None, bad

    # -- save --------------------------------------------------------------------------------------------
    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = True) -> None:
        """Start an (async) save of one step; call `wait()` before relying on it being on disk.

        A failed write (disk full, permissions) -- of this step, or of the previous async save, which Orbax
        reports here -- is a WriteError naming the directory; the steps already complete are untouched.
        """
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(_jsonable(meta))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.wait()  # Orbax waits for the previous save anyway; here its failure is reported with its own step
        self._check_free_space(step, (params, opt_state))
        with self._write_errors(step):
            self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._pending = step

    def _check_free_space(self, step: int, trees) -> None:
        """WriteError before writing if the filesystem cannot hold this step (Orbax would fail midway)."""
        if storage.is_url(self.directory):
            return  # object storage has no free-space figure; a failed upload is reported by the write
        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(trees)) // max(jax.process_count(), 1)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return  # not a local filesystem we can ask (the write itself will report failures)
        if free < need * 1.05 + (1 << 20):
            done = self.steps()
            kept = f"the last complete step ({done[-1]}) is intact" if done else "no earlier step exists"
            raise WriteError(f"not enough disk space for checkpoint step {step} in {self.directory}: it needs about "
                             f"{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; {kept}; free space and "
                             f"run again to resume")

    def wait(self) -> None:
        with self._write_errors(self._pending):
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def _write_errors(self, step: int | None):
        return _WriteErrors(self, step)

    # -- restore -----------------------------------------------------------------------------------------
    def restore_meta(self, step: int) -> dict:
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple[Any, Any, dict]:
        """Restore onto the shardings carried by the abstract trees (jax.ShapeDtypeStruct with `.sharding`).

        Because the target shardings come from the caller's mesh, a checkpoint saved on one mesh or device count
        restores onto another.
        """
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, dict(out["meta"])


class _WriteErrors:
    """Context manager: OSErrors of a save (or of an earlier async save surfacing now) become WriteErrors."""

    def __init__(self, ckpt: Checkpointer, step: int | None):
        self.ckpt, self.step = ckpt, step

    def __enter__(self):
        return self

    def __exit__(self, kind, err, _tb):
        if err is None or not _is_write_failure(err):
            return False
        done = [s for s in self.ckpt.steps() if self.step is None or s < self.step]
        what = "a checkpoint" if self.step is None else f"checkpoint step {self.step}"
        kept = f"the last complete step ({done[-1]}) is intact" if done else "no earlier step exists"
        raise WriteError(f"could not write {what} to {self.ckpt.directory} ({describe_failure(err)}); "
                         f"{kept}; free space and run again to resume") from None


_NOISE_FILTER_INSTALLED = False


def _quiet_failed_write_noise() -> None:
    """Keep a failed async save from printing tracebacks: it is reported once, as a WriteError, by the loop.

    (Also drops Orbax's notices about read-only managers, which every restore here opens.)

    When a write fails (disk full), Orbax's background threads log the error with its traceback (so do the
    asyncio tasks left unretrieved), and TensorStore callbacks racing the closed event loop report
    `RuntimeError: Event loop is closed` as unraisable exceptions, dozens of tracebacks that interleave with (and
    can split) the run's one-line verdict. Both are dropped; every other log record, uncaught or unraisable
    exception is left alone.
    """
    global _NOISE_FILTER_INSTALLED
    if _NOISE_FILTER_INSTALLED:
        return
    import logging
    import sys

    def drop_write_failures(record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and _is_write_failure(err):
            return False
        # Orbax notes every read-only open (how restore and params-only loads work here): expected, not news.
        message = str(record.msg)
        return not ("read_only=True, setting" in message or message.startswith("Given directory is read only"))

    for name in ("absl", "asyncio"):  # Orbax's threads log via absl; unretrieved asyncio tasks via asyncio
        logging.getLogger(name).addFilter(drop_write_failures)

    def closed_loop(err) -> bool:
        return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"

    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, err, tb):
        if not closed_loop(err):
            previous_excepthook(kind, err, tb)

    def unraisablehook(unraisable):  # TensorStore's C++ callback threads report theirs as unraisable
        if not closed_loop(unraisable.exc_value):
            previous_unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    _NOISE_FILTER_INSTALLED = True


def _is_write_failure(err: BaseException) -> bool:
    """An OSError, or an Orbax/TensorStore error whose message (or cause chain) reports one."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return True
        text = str(err).lower()
        if any(s in text for s in ("no space left", "file too large", "disk quota", "read-only file system",
                                   "permission denied", "errno 28", "errno 27")):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _latest_complete(ckpt: Checkpointer, directory: str, step: int | None) -> int:
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            raise UserFileNotFoundError(f"no complete checkpoint in {directory} (it holds: "
                                  f"{', '.join(storage.listdir(directory)[:8]) or 'nothing'})")
    elif step not in ckpt.steps():
        raise UserFileNotFoundError(f"{directory} has no checkpoint step {step}; it has steps "
                                    f"{', '.join(map(str, ckpt.steps())) or 'none'}")
    return step


def _params_tree(ckpt: Checkpointer, step: int):
    """The params item's metadata as a plain nested dict of ArrayMetadata (None if the step has no params)."""
    metadata = ckpt._manager.item_metadata(step)["params"]
    return getattr(metadata, "tree", metadata)


@contextlib.contextmanager
def _reading(path: str | os.PathLike, step: int | None):
    """(read-only Checkpointer, checkpoint root, step: the given one or the latest complete), closed after."""
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory, read_only=True, async_save=False)
    try:
        yield ckpt, directory, _latest_complete(ckpt, directory, step)
    finally:
        ckpt.close()


def params_metadata(path: str | os.PathLike, *, step: int | None = None) -> tuple[int, Any, dict]:
    """(step, tree of array metadata with .shape/.dtype, meta) of a checkpoint's params, without loading them."""
    with _reading(path, step) as (ckpt, directory, step):
        try:
            meta = ckpt.restore_meta(step)
            metadata = _params_tree(ckpt, step)
        except Exception as err:
            raise CheckpointError(f"checkpoint {directory} step {step} cannot be read "
                                  f"({describe_failure(err)})") from None
        if metadata is None:
            raise CheckpointError(f"checkpoint {directory} step {step} has no params item")
    return step, metadata, meta


def check_params_match(path: str, metadata, abstract_params, *, step: int, what: str) -> None:
    """CheckpointError listing every missing, unexpected or wrongly shaped array (checkpoint vs model)."""
    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}

    have, want = flat(metadata), flat(abstract_params)
    problems = [f"{k} missing" for k in sorted(want.keys() - have.keys())]
    problems += [f"{k} unexpected" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k} has shape {have[k]} in the checkpoint, the model needs {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{what}={path} (step {step}) does not fit the configured model: {shown}. Set the "
                              f"model.* keys to the checkpoint's (its meta config says them)")


def load_params(path: str | os.PathLike, abstract_params=None, *, step: int | None = None) -> tuple[Any, dict]:
    """Params (and meta) from a checkpoint root or a workdir; latest step unless `step` is given.

    With `abstract_params` the arrays land on its shardings; without, they come back as host numpy arrays.
    A missing, unreadable or corrupt checkpoint is a CheckpointError naming the directory and the step.
    """
    with _reading(path, step) as (ckpt, directory, step):
        try:
            meta = ckpt.restore_meta(step)
            if abstract_params is None:
                # Restore every array onto one local device whatever mesh saved it, then hand back host numpy.
                metadata = _params_tree(ckpt, step)
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                        metadata)
            else:
                abstract = abstract_params
            args = ocp.args.StandardRestore(abstract)
            params = ckpt._manager.restore(step, args=ocp.args.Composite(params=args))["params"]
        except Exception as err:  # corrupt files: JSON, TensorStore, KeyError, ... errors
            raise CheckpointError(f"checkpoint {directory} step {step} cannot be restored "
                                  f"({describe_failure(err)}); pick another step (--step N / a copy of the "
                                  f"run) or re-create it") from None
    if abstract_params is None:
        params = jax.tree.map(np.asarray, params)
    return params, meta


def save_params(path: str | os.PathLike, params, meta: dict, *, step: int = 0) -> str:
    """Write a params-only checkpoint (no optimizer state), e.g. a converted Hugging Face model."""
    ckpt = Checkpointer(path, keep=1, async_save=False)
    ckpt.save(step, params, None, meta)
    ckpt.close()
    return ckpt.directory


def _jsonable(value):
    """Turn numpy scalars/arrays inside meta into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
