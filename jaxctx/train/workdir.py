"""A training workdir's own files: the config record, resume compatibility, metrics rows, safe writes.

A workdir records the config it was first started with in `config.yaml`, which is never rewritten. A later start
on the same workdir is compared key by key with the newest record before anything is written:

- keys that decide the model, its parameters' shapes, the optimizer state's structure or the data stream
  (`model.d_model`, `data.seq_len`, `train.batch_size`, `train.optimizer`, ...) must be equal; a mismatch is a
  `WorkdirError` listing every differing key and both values, and no file is touched;
- keys that may legitimately change when a run is continued (`RESUMABLE_KEYS`: steps, logging, checkpoint and
  eval cadence, the learning-rate schedule, kernels and memory settings, the mesh) are accepted, and the new
  config is recorded beside the first as `config.resumed-<step>.yaml` with the changed keys in its header.

Everything here is checked by `plan_start` (read only); `commit_start` does the writes, after every other
pre-flight check of the run has passed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import yaml

from jaxctx import config as config_lib
from jaxctx import storage
from jaxctx.errors import WorkdirError, WriteError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
UNRESTORABLE = "checkpoints.unrestorable"  # bad steps are moved here (kept for the user, out of Orbax's sight)

# Keys a continued run may change; every other key of the recorded config must match (see the module docstring).
RESUMABLE_KEYS = {
    "model": {"attention", "attention_block_q", "attention_block_k", "context_parallel", "mlp_chunk", "loss_chunk",
              "remat_policy", "remat_group_size", "dtype"},  # how the same maths is computed, not what it is
    "data": {"num_proc", "cache_dir"},  # how the same token stream is produced
    "train": {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "keep_best",
              "init_from", "extend_positions", "stop_after", "learning_rate", "warmup_steps", "decay", "min_lr_ratio", "weight_decay",
              "beta1", "beta2", "grad_clip", "grad_accum", "peak_tflops",
              "wandb_project", "wandb_mode"},
    "parallel": None,  # None = every key: a run restores onto any mesh, jit or pmap, any number of processes
}


@dataclasses.dataclass
class StartPlan:
    """What a start on a workdir will write, decided by `plan_start` without writing anything."""

    workdir: str
    record: str | None  # path of the newest config record, None for a new workdir
    changed: dict  # allowed key -> (recorded value, requested value)


def _flat(values: dict) -> dict:
    return {f"{section}.{key}": value for section, keys in values.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def _resumable(flat_key: str) -> bool:
    section, key = flat_key.split(".", 1)
    allowed = RESUMABLE_KEYS.get(section, set())
    return allowed is None or key in allowed


def _record_step(path: str) -> tuple[int, int]:
    """Sort key of a record: config.yaml first, then config.resumed-<step>[-<n>].yaml by step and n."""
    match = re.search(r"config\.resumed-(\d+)(?:-(\d+))?\.yaml$", path)
    return (-1, 0) if match is None else (int(match.group(1)), int(match.group(2) or 0))


def config_records(workdir: str) -> list[str]:
    """The workdir's config records, oldest first."""
    names = storage.listdir(workdir)
    paths = [storage.join(workdir, n) for n in names if re.fullmatch(r"config\.resumed-\d+(-\d+)?\.yaml", n)]
    if CONFIG_FILE in names:
        paths.append(storage.join(workdir, CONFIG_FILE))
    return sorted(paths, key=_record_step)


def _read_record(path: str) -> dict:
    try:
        values = yaml.safe_load(storage.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise WorkdirError(f"{path} cannot be read as the workdir's config record ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); restore it, or use another "
                           f"--workdir") from None
    if not isinstance(values, dict):
        raise WorkdirError(f"{path} does not hold a config mapping; restore it, or use another --workdir")
    return values


def check_usable(workdir: str) -> None:
    """The workdir is a directory (or can be made one) that this process may write into.

    A URL (gs://bucket/run) is not checked here: its bucket and permissions are GCS's to say, on the first write.
    """
    if storage.is_url(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} exists and is not a directory; pass --workdir DIR naming a "
                           f"directory (new or a previous run's)")
    probe = workdir
    while not os.path.exists(probe):
        parent = os.path.dirname(probe) or "."
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise WorkdirError(f"workdir {workdir} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable ({probe} denies write permission)")


def _checkpoint_config(workdir: str) -> dict | None:
    """The config in the newest checkpoint's meta (read as plain JSON: no Orbax, no JAX backend), if any."""
    root = storage.join(workdir, CHECKPOINTS)
    steps = sorted((int(n) for n in storage.listdir(root) if n.isdigit()), reverse=True)
    for step in steps:
        try:
            meta = json.loads(storage.read_bytes(storage.join(root, str(step), "meta", "metadata")))
        except (OSError, ValueError):
            continue  # a corrupt newest step: the restore will say so; an older one still tells the config
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return meta["config"]
    return None


def plan_start(cfg: config_lib.Config, workdir: str) -> StartPlan:
    """Compare `cfg` with what the workdir recorded; refuse a different model or data (nothing is written).

    The record is the newest `config*.yaml`; a workdir with checkpoints but no record (written by hand or by an
    older jaxctx) is compared with the config saved in its newest readable checkpoint.
    """
    check_usable(workdir)
    is_dir = storage.isdir(workdir)
    records = config_records(workdir) if is_dir else []
    checkpoint_config = None if records or not is_dir else _checkpoint_config(workdir)
    if records:
        recorded, record = _read_record(records[-1]), records[-1]
    elif checkpoint_config is not None:
        recorded, record = checkpoint_config, storage.join(workdir, CHECKPOINTS)
    else:
        for name in (METRICS_FILE, CHECKPOINTS):
            if storage.exists(storage.join(workdir, name)) and (name != CHECKPOINTS or storage.listdir(
                    storage.join(workdir, name))):
                raise WorkdirError(f"workdir {workdir} has {name} but no {CONFIG_FILE} or readable checkpoint "
                                   f"config, so it is not a jaxctx run this command can continue; use another "
                                   f"--workdir")
        return StartPlan(workdir=workdir, record=None, changed={})
    requested = _flat(yaml.safe_load(config_lib.to_yaml(cfg)))  # the same YAML round trip as the record
    before = _flat(recorded)
    refused, changed = [], {}
    for key, value in requested.items():
        if key not in before or before[key] == value:  # a key the record predates takes the new value
            continue
        if _resumable(key):
            changed[key] = (before[key], value)
        else:
            refused.append(f"{key}: {before[key]!r} in the workdir, {value!r} requested")
    if refused:
        raise WorkdirError(f"workdir {workdir} holds a run of a different model or data ({record}); "
                           f"{'; '.join(refused)}. Nothing was changed: give this run another --workdir (these "
                           f"keys cannot change within one run)")
    return StartPlan(workdir=workdir, record=record, changed=changed)


def commit_start(plan: StartPlan, cfg: config_lib.Config, step: int) -> str | None:
    """Create the workdir and record the config (first start) or the changed keys (a continued run).

    Returns the path written, or None if nothing changed. Never overwrites an existing record.
    """
    try:
        storage.makedirs(plan.workdir)
    except OSError as err:
        raise WriteError(f"cannot create workdir {plan.workdir}: {err}") from None
    text = config_lib.to_yaml(cfg)
    if plan.record is None or not config_records(plan.workdir):
        path = storage.join(plan.workdir, CONFIG_FILE)
        if storage.exists(path):  # pragma: no cover - plan_start saw no record; another process made one
            raise WorkdirError(f"{path} appeared while this run was starting; is another run using the workdir?")
        write_atomic(path, text)
        return path
    if not plan.changed:
        return None
    header = "".join(f"# {key}: {old!r} -> {new!r}\n" for key, (old, new) in sorted(plan.changed.items()))
    path = _free_name(storage.join(plan.workdir, f"config.resumed-{step}.yaml"))
    write_atomic(path, f"# config of the run continued at step {step}; changed from the previous record:\n"
                       f"{header}{text}")
    return path


def _free_name(path: str) -> str:
    if not storage.exists(path):
        return path
    stem = path[: -len(".yaml")]
    n = 2
    while storage.exists(f"{stem}-{n}.yaml"):
        n += 1
    return f"{stem}-{n}.yaml"


def write_atomic(path: str, text: str) -> None:
    """Write `text` to a temp file beside `path`, then move it into place (a crash leaves the old file)."""
    storage.write_atomic(path, text)


def _rows(path: str) -> tuple[list[str], list[dict | None]]:
    """metrics.jsonl's lines and their parsed rows (None for a line that is not a JSON object)."""
    if not storage.exists(path):
        return [], []
    lines = storage.read_text(path).splitlines(keepends=True)
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else None)
    return lines, rows


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep only metrics rows with step <= last_step (atomically), so a restarted run's log has no duplicates.

    A row cut short by a crash (the last line, unparseable) is dropped too.
    """
    lines, rows = _rows(path)
    kept = [json.dumps(row) + "\n" for row in rows if row is not None and row.get("step", 0) <= last_step]
    if kept != lines:
        write_atomic(path, "".join(kept))


def append_metrics(path: str, row: dict) -> None:
    """Append one JSON row; a failed write (disk full) is a WriteError naming the file."""
    try:
        storage.append_text(path, json.dumps(row) + "\n")
    except OSError as err:
        raise WriteError(f"could not append step {row.get('step')} to {path}: {err}") from None


def has_row(path: str, step: int, key: str) -> bool:
    """Whether metrics.jsonl already holds a row for `step` carrying `key` (e.g. that step's validation)."""
    return any(row is not None and row.get("step") == step and key in row for row in _rows(path)[1])
