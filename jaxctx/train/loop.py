"""The training job: `python train.py [--config FILE] [--workdir DIR] [--set key=value ...]`.

Stages, in order: distributed init -> config -> mesh -> data -> model + optimizer -> state (fresh, resumed or
`init_from`) -> compiled step -> loop (metrics, checkpoints, signals) -> validation. All I/O lives here; the step
itself (jaxctx.train.step) is pure.

A workdir holds `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per logged step) and
`checkpoints/` (Orbax). The same command on a workdir with checkpoints resumes from the latest one and, because
the data-iterator position is saved with it, continues on exactly the next batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from jaxctx import config as config_lib
from jaxctx.checkpoint import Checkpointer, load_params
from jaxctx.parallel import make_mesh
from jaxctx.train.cli import add_arguments
from jaxctx.train.runner import make_runner

DEFAULT_WORKDIR_ROOT = "workdirs"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def default_workdir(config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join(DEFAULT_WORKDIR_ROOT, name)


def maybe_initialize_distributed(cfg_parallel) -> None:
    """jax.distributed.initialize() when the config or the environment describes a multi-process job."""
    explicit = cfg_parallel.coordinator_address is not None
    cluster = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                             "MEGASCALE_COORDINATOR_ADDRESS"))
    if explicit:
        jax.distributed.initialize(coordinator_address=cfg_parallel.coordinator_address,
                                   num_processes=cfg_parallel.num_processes, process_id=cfg_parallel.process_id)
    elif cluster and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:  # every process must agree, or the collective save would hang
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def run(cfg: config_lib.Config, workdir: str, *, devices=None) -> int:
    """Train `cfg` in `workdir`; returns the process exit code (0 ok, 1 stopped on a non-finite step).

    `devices` restricts the mesh to a subset of the devices (default: all devices of all processes).
    """
    from jaxctx.data import build_iterator

    is_main = _process_info()[0] == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        _write_atomic(os.path.join(workdir, "config.yaml"), config_lib.to_yaml(cfg))

    # Data first: tokenization may fork worker processes, which must happen before JAX starts its backend threads.
    process_index, process_count = _process_info()
    import datasets
    datasets.disable_progress_bars()  # one summary line below instead of a bar per preparation stage
    train_data = build_iterator(cfg, "train", process_index=process_index, process_count=process_count)
    val_data = None
    if cfg.data.validation_fraction > 0:
        val_data = build_iterator(cfg, "validation", process_index=process_index, process_count=process_count)
    stats = train_data.stats()
    _log(f"data: {stats['source']}, {stats['documents']} documents, {stats['corpus_tokens']} tokens "
         f"({stats['tokenizer']} tokenizer), {stats['rows_per_epoch']} rows of {cfg.data.seq_len} per epoch")
    mesh = make_mesh(cfg.parallel, devices)
    runner = make_runner(cfg, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints)

    # --- state: resume > init_from > fresh ---------------------------------------------------------------
    start = ckpt.latest_step()
    if start is not None:
        state, meta = runner.restore(ckpt, start)
        train_data.set_state(meta["data"])
        if is_main:  # rows logged after the checkpoint (by a run that then died) will be logged again
            _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
        _log(f"resumed from {ckpt.directory} at step {start}")
        if start >= cfg.train.steps:
            _log(f"already at train.steps={cfg.train.steps}: nothing to train (raise train.steps to continue)")
    else:
        state = runner.init(cfg.train.seed)
        if cfg.train.init_from:
            params, _ = load_params(cfg.train.init_from, runner.abstract_params())
            state = runner.with_params(state, params)
            _log(f"initialised params from {cfg.train.init_from} (fresh optimizer)")
        start = 0
    _log(f"workdir: {os.path.abspath(workdir)}  |  mesh {dict(mesh.shape)}  |  "
         f"{runner.param_count() / 1e6:.2f}M params  |  attention={cfg.model.attention}")

    stop = _StopFlag()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    progress = _progress(start, cfg.train.steps, enabled=is_main)
    pending = None  # (step, metrics on device, dispatch time): fetched one step late so dispatch never stalls
    last_time = time.perf_counter()
    status, step = 0, start
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = runner.put_batch(next(train_data))
            state, metrics = runner.step(state, batch)
            if pending is not None and not _report(pending, metrics_path, tokens_per_step, cfg, progress):
                status = _non_finite(pending[0], ckpt)
                break
            pending = (step, metrics, last_time)
            last_time = time.perf_counter()
            stopping = step == cfg.train.stop_after or stop.requested()
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stopping:
                ok = _report(pending, metrics_path, tokens_per_step, cfg, progress)
                pending = None
                if not ok:
                    status = _non_finite(step, ckpt)
                    break
                runner.save(ckpt, step, state, {"step": step, "data": train_data.get_state(),
                                                "config": cfg.to_dict()})
                if stopping:
                    reason = f"{stop.signal} received" if stop.signal else "train.stop_after reached"
                    _log(f"\n{reason}: checkpoint saved at step {step}; exiting (run again to resume)")
                    break
        else:
            if pending is not None and not _report(pending, metrics_path, tokens_per_step, cfg, progress):
                status = _non_finite(pending[0], ckpt)
    finally:
        progress.close()
        ckpt.close()
        stop.restore()

    if status == 0 and step == cfg.train.steps:
        evaluate(cfg, runner, state, val_data)
    if is_main:
        print(f"workdir: {os.path.abspath(workdir)}")
    return status


def _process_info() -> tuple[int, int]:
    """(process index, process count) without starting a JAX backend (jax.process_index() would)."""
    try:
        from jax._src import distributed
        state = distributed.global_state
    except (ImportError, AttributeError):  # private API moved: ask jax (starts the backend, still correct)
        return jax.process_index(), jax.process_count()
    if state.client is None:
        return 0, 1
    return int(state.process_id), int(state.num_processes)


def _non_finite(step: int, ckpt: Checkpointer) -> int:
    ckpt.wait()
    last = ckpt.latest_step()
    _log(f"\nstopping: non-finite loss or gradient at step {step}; the update was not applied and the last "
         f"good checkpoint (step {last}) is left as it was")
    return 1


def _report(pending, metrics_path: str, tokens_per_step: int, cfg, progress) -> bool:
    """Fetch one step's metrics (blocks until it finished); log them; False if the step was non-finite."""
    step, metrics, started = pending
    host = jax.device_get(metrics)
    elapsed = time.perf_counter() - started
    if not bool(host["finite"]):
        return False
    row = {"step": step, "loss": float(host["loss"]), "lr": float(host["lr"]),
           "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tokens_per_step / elapsed,
           "step_time_s": elapsed}
    progress.update(1)
    progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
    if jax.process_index() == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return True


def evaluate(cfg, runner, state, data) -> dict | None:
    """Validation loss and perplexity over `train.eval_batches` held-out batches (None if there is no split)."""
    if data is None:
        return None
    data.seek(0)
    loss_sum = weight_sum = 0.0
    for _ in range(cfg.train.eval_batches):
        batch = runner.put_batch(next(data))
        l_sum, w_sum = jax.device_get(runner.eval(state, batch))
        loss_sum, weight_sum = loss_sum + float(l_sum), weight_sum + float(w_sum)
    loss = loss_sum / max(weight_sum, 1.0)
    result = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": weight_sum}
    _log(f"validation: loss {loss:.4f}  perplexity {result['val_perplexity']:.2f}  "
         f"({int(weight_sum)} scored tokens)")
    return result


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep only metrics rows with step <= last_step (atomically), so a resumed run's log has no duplicates."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    _write_atomic(path, "".join(rows))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2
    maybe_initialize_distributed(cfg.parallel)
    workdir = args.workdir or default_workdir(args.config)
    try:
        return run(cfg, workdir)
    except config_lib.ConfigError as err:
        print(f"train.py: config error: {err}", file=sys.stderr)
        return 2
