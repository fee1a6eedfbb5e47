"""The training job behind `python train.py` and `jaxctx train` (their command line is jaxctx.train.cli).

Stages, in order: distributed init -> config -> mesh -> data -> model + optimizer -> state (fresh, resumed or
`init_from`) -> compiled step -> loop (metrics, checkpoints, signals) -> validation. All I/O lives here; the step
itself (jaxctx.train.step) is pure.

A workdir holds `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per logged step) and
`checkpoints/` (Orbax). The same command on a workdir with checkpoints resumes from the latest one and, because
the data-iterator position is saved with it, continues on exactly the next batch.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import jax
import numpy as np

from jaxctx import config as config_lib
from jaxctx import storage
from jaxctx.checkpoint import Checkpointer, checkpoint_dir, quarantine
from jaxctx.data.labels import save_labels
from jaxctx.errors import WriteError
from jaxctx.parallel import data_group, make_mesh
from jaxctx.platform import check_platform
from jaxctx.train import task_eval, warm_start
from jaxctx.train import workdir as workdir_lib
from jaxctx.train.metrics_log import MetricsLog, check_available
from jaxctx.train.runner import make_runner
from jaxctx.train.step import check_task_data
from jaxctx.train.throughput import Throughput

DEFAULT_WORKDIR_ROOT = "workdirs"


def default_workdir(config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "default"
    return os.path.join(DEFAULT_WORKDIR_ROOT, name)


# What `srun` sets for each task and JAX's SLURM cluster detection (jax/_src/clusters/slurm_cluster.py) needs to
# derive the coordinator (first host of SLURM_STEP_NODELIST, port 61440 + SLURM_JOB_ID % 4096 unless
# JAX_COORDINATOR_PORT), the process count/id and the one local GPU of this task (SLURM_LOCALID).
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def maybe_initialize_distributed(cfg_parallel) -> None:
    """jax.distributed.initialize() when the config or the environment describes a multi-process job."""
    if cfg_parallel.coordinator_address is not None:
        jax.distributed.initialize(coordinator_address=cfg_parallel.coordinator_address,
                                   num_processes=cfg_parallel.num_processes, process_id=cfg_parallel.process_id)
        return
    # A SLURM job step of several tasks (`srun`). Only srun's step variables count: a batch script or `salloc`
    # shell also has SLURM_NTASKS but runs one process, which JAX could not join to a cluster.
    slurm = (all(k in os.environ for k in SLURM_STEP_VARIABLES) and os.environ["SLURM_NTASKS"].isdigit()
             and int(os.environ["SLURM_NTASKS"]) > 1)
    # JAXCTX_DISTRIBUTED: set by tpu/launch; a Cloud TPU VM's environment names no cluster (JAX finds the slice's
    # workers from the VM metadata once asked to initialize).
    other = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                                          "MEGASCALE_COORDINATOR_ADDRESS", "JAXCTX_DISTRIBUTED"))
    if slurm or other:
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
    """Train `cfg` in `workdir`; returns the process exit code (0 ok, 1 stopped on a bad step).

    Every check that can fail on the user's input (workdir, data, tokenizer, platform kernel, checkpoints,
    `train.init_from`) runs before the first file is written, so a failed start leaves the workdir as it was.
    `devices` restricts the mesh to a subset of the devices (default: all devices of all processes).
    """
    process_index, process_count = _process_info()
    is_main = process_index == 0
    storage.set_tensorstore_timeouts()  # before TensorStore first runs (checkpoints on gs://)
    metrics_path = storage.join(workdir, workdir_lib.METRICS_FILE)
    ckpt_dir = storage.join(workdir, workdir_lib.CHECKPOINTS)

    # --- pre-flight: nothing in this section writes a file ------------------------------------------------
    plan = workdir_lib.plan_start(cfg, workdir)  # refuses a workdir of another model before any work
    check_task_data(cfg)  # a task model needs labelled batches
    task_eval.check_keep_best(cfg)
    check_available(cfg)  # a configured W&B without the package fails now, before anything is written
    if cfg.train.init_from and not storage.isdir(ckpt_dir):
        checkpoint_dir(cfg.train.init_from)  # a missing init_from fails now, not after the data is prepared
    # Data first: tokenization may fork worker processes, which must happen before JAX starts its backend threads.
    import datasets
    datasets.disable_progress_bars()  # one summary line below instead of a bar per preparation stage
    train_data, val_data = _data(cfg, process_index, process_count)
    check_platform(cfg)
    mesh = make_mesh(cfg.parallel, devices)
    group = data_group(mesh)
    if (group.index, group.count) != (process_index, process_count):
        # A sequence axis spans processes: the processes holding the same rows must load the same rows, so the
        # data is built again per data group (tokenized in-process now that the backend runs; see sources.py).
        train_data, val_data = _data(cfg, group.index, group.count)
    stats = train_data.stats()
    _log(f"data: {stats['source']}, {stats['documents']} documents, {stats['corpus_tokens']} tokens "
         f"({stats['tokenizer']} tokenizer), {stats['rows_per_epoch']} rows of {cfg.data.seq_len} per epoch")
    runner = make_runner(cfg, mesh)
    state, start, unrestorable = _initial_state(cfg, runner, ckpt_dir, train_data)

    # --- commit: the start is valid; record it -----------------------------------------------------------
    if is_main:
        for step, reason in unrestorable:
            moved = quarantine(ckpt_dir, step)
            _log(f"warning: checkpoint step {step} cannot be restored ({reason}); moved it to {moved} and "
                 f"resumed from step {start}")
        written = workdir_lib.commit_start(plan, cfg, start)
        if written and plan.changed:
            _log(f"continuing with changed settings ({', '.join(sorted(plan.changed))}), recorded in {written}")
        # rows logged after the restored step (by a run that then died) will be logged again
        workdir_lib.truncate_metrics(metrics_path, start)
        if getattr(train_data, "labels", None) is not None:  # a task model's label names, for predict / exports
            save_labels(workdir, train_data.labels, {"source": cfg.data.source, "task": cfg.data.task})
    _sync_processes("jaxctx-start")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints)
    log = MetricsLog(cfg, workdir, start=start, enabled=is_main)
    if start > 0:
        _log(f"resumed from {ckpt.directory} at step {start}")
        if start >= cfg.train.steps:
            _log(f"already at train.steps={cfg.train.steps}: nothing to train (raise train.steps to continue)")
    elif cfg.train.init_from:
        _log(f"initialised params from {cfg.train.init_from} (fresh optimizer)")
    _log(f"workdir: {storage.absolute(workdir)}  |  mesh {dict(mesh.shape)}  |  "
         f"{runner.param_count() / 1e6:.2f}M params  |  attention={cfg.model.attention}")

    best = task_eval.BestKeeper(workdir, cfg.train.keep_best)
    stop = _StopFlag()
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    progress = _progress(start, cfg.train.steps, enabled=is_main)
    pending = None  # (step, metrics on device): fetched one step late so dispatch never stalls
    clock = _StepClock(devices=mesh.size)
    throughput = Throughput(cfg, runner.abstract_params(), list(mesh.devices.flat))
    status, step = 0, start
    last_validation = None
    failed = True
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = runner.put_batch(next(train_data))
            state, metrics = runner.step(state, batch)
            if pending is not None:
                status = _report(pending, log, tokens_per_step, cfg, progress, ckpt, clock, throughput)
                if status:
                    break
            pending = (step, metrics)
            final = step == cfg.train.steps
            stopping = step == cfg.train.stop_after or stop.requested()
            validating = val_data is not None and (final or (cfg.train.eval_every > 0
                                                             and step % cfg.train.eval_every == 0))
            if validating or step % cfg.train.checkpoint_every == 0 or final or stopping:
                status = _report(pending, log, tokens_per_step, cfg, progress, ckpt, clock, throughput)
                pending = None
                if status:
                    break
                if validating:
                    # Before the save: once this step's checkpoint exists, its validation row exists too, so a
                    # resume from it never lacks the row (a row logged past the restored step is trimmed).
                    last_validation = record_validation(cfg, runner, state, val_data, step, log, best, train_data)
                    clock.restart()  # the validation pass is not part of the next step's time
                if step % cfg.train.checkpoint_every == 0 or final or stopping:
                    runner.save(ckpt, step, state, {"step": step, "data": train_data.get_state(),
                                                    "config": cfg.to_dict()})
                if stopping:
                    reason = f"{stop.signal} received" if stop.signal else "train.stop_after reached"
                    ckpt.wait()
                    _log(f"\n{reason}: checkpoint saved at step {step}; exiting (run again to resume)")
                    break
        else:
            if pending is not None:
                status = _report(pending, log, tokens_per_step, cfg, progress, ckpt, clock, throughput)
            if start >= cfg.train.steps and val_data is not None:  # nothing trained: the run's result again
                last_validation = record_validation(cfg, runner, state, val_data, start, log, best,
                                                    train_data)
        failed = False
    finally:
        progress.close()
        stop.restore()
        log.close()
        try:
            ckpt.close()
        except WriteError:
            if not failed:  # an error already on its way out is the one to report
                raise

    if status == 0 and step == cfg.train.steps and last_validation and last_validation.get("report") and is_main:
        print(task_eval.format_report(last_validation["report"]))  # a task model's per-class report
    if is_main:
        print(f"workdir: {storage.absolute(workdir)}")
    return status


def _data(cfg, index: int, count: int):
    """(train, validation or None) iterators for data group `index` of `count` (usually the process's own)."""
    from jaxctx.data import build_iterator

    train = build_iterator(cfg, "train", process_index=index, process_count=count)
    # Labelled data (data.task) may bring a validation file of its own, whatever validation_fraction says.
    has_validation = cfg.data.validation_fraction > 0 or cfg.data.task is not None
    val = build_iterator(cfg, "validation", process_index=index, process_count=count) if has_validation else None
    return train, val


def _initial_state(cfg, runner, ckpt_dir: str, train_data):
    """(state, start step, [(unrestorable step, reason)]): resume > train.init_from > fresh. Writes nothing."""
    if storage.isdir(ckpt_dir):
        reader = Checkpointer(ckpt_dir, read_only=True, async_save=False)
        try:
            start, restored, unrestorable = reader.restore_newest(lambda s: runner.restore(reader, s))
        finally:
            reader.close()
        if start is not None:
            state, meta = restored
            train_data.set_state(meta["data"])
            return state, start, unrestorable
    if cfg.train.init_from and cfg.model.task != "lm":  # a task model: backbone loaded, head fresh (logged)
        return runner.with_params(runner.init(cfg.train.seed), warm_start.task_params(cfg, runner)), 0, []
    if cfg.train.init_from:
        return runner.with_params(runner.init(cfg.train.seed), warm_start.lm_params(cfg, runner)), 0, []
    return runner.init(cfg.train.seed), 0, []


def _sync_processes(name: str) -> None:
    """Every process waits here (process 0 may have moved checkpoints aside) before opening the checkpoints."""
    if _process_info()[1] > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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


def _stop_on_bad_step(step: int, ckpt: Checkpointer, problem: str) -> int:
    ckpt.wait()
    last = ckpt.latest_step()
    _log(f"\nstopping: {problem} at step {step}; the update was not applied and the last good checkpoint "
         f"(step {last}) is left as it was")
    return 1


class _StepClock:
    """A step's wall time runs from the previous step's completion to its own (completion = its metrics
    fetched). With the one-step-late fetch, timing from a step's dispatch would span two steps."""

    def __init__(self, devices: int):
        self.devices = devices
        self.last_done = time.perf_counter()  # the first step's time includes its compilation

    def restart(self) -> None:
        """Time the next step from now (after work that is not a step: a validation pass)."""
        self.last_done = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last_done = now - self.last_done, now
        return elapsed


def _report(pending, log: MetricsLog, tokens_per_step: int, cfg, progress, ckpt: Checkpointer,
            clock: _StepClock, throughput: Throughput) -> int:
    """Fetch one step's metrics (blocks until it finished) and log them; returns the exit status so far.

    A non-finite loss or gradient, or a batch with no scored token (the step skipped its update for either),
    stops the run with status 1 and a message naming the step.
    """
    step, metrics = pending
    host = jax.device_get(metrics)
    elapsed = clock.lap()
    if not bool(host["finite"]):
        return _stop_on_bad_step(step, ckpt, "non-finite loss or gradient")
    if float(host["tokens"]) <= 0:
        return _stop_on_bad_step(step, ckpt, "a batch with no scored tokens (every loss_mask entry is 0: the data "
                                             "gave the loss nothing to average; check data.* and the corpus)")
    row = {"step": step, "loss": float(host["loss"]), "lr": float(host["lr"]),
           "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tokens_per_step / elapsed,
           "tokens_per_sec_per_device": tokens_per_step / elapsed / clock.devices, "step_time_s": elapsed}
    for key in ("nsp_loss", "nsp_accuracy"):  # BERT pretraining with data.nsp (jaxctx.train.step)
        if key in host:
            row[key] = float(host[key])
    progress.update(1)
    progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
    if jax.process_index() == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
        row.update(throughput.columns(row["tokens_per_sec"]))
        log.append(row)
    return 0


def evaluate(cfg, runner, state, data) -> dict | None:
    """Validation loss and perplexity over `train.eval_batches` held-out batches (None if there is no split).

    Always the same batches (the split is read from its start), so passes at different steps are comparable and a
    resumed run's pass equals the uninterrupted run's.
    """
    if data is None:
        return None
    data.seek(0)
    loss_sum = weight_sum = 0.0
    for _ in range(cfg.train.eval_batches):
        batch = runner.put_batch(next(data))
        l_sum, w_sum = jax.device_get(runner.eval(state, batch))
        loss_sum, weight_sum = loss_sum + float(l_sum), weight_sum + float(w_sum)
    loss = loss_sum / max(weight_sum, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_tokens": weight_sum}


def record_validation(cfg, runner, state, data, step: int, log: MetricsLog, best, train_data) -> dict:
    """A validation pass at `step` (every process: it is collective): printed, and logged as a metrics row of its
    own (process 0) -- `{"step", "val_loss", "val_perplexity", "val_tokens"}` for language models, the task
    metrics for task models -- unless that step's row is already there (a finished run started again). With
    train.keep_best, an improved metric saves the checkpoint into WORKDIR/best/."""
    if cfg.model.task == "lm":
        result = evaluate(cfg, runner, state, data)
        _log(f"validation at step {step}: loss {result['val_loss']:.4f}  perplexity {result['val_perplexity']:.2f}  "
             f"({int(result['val_tokens'])} scored tokens)")
    else:
        result = task_eval.evaluate_task(cfg, runner, state, data, log=_log)
    row = {"step": step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
    if not log.has_row(step, "val_loss"):
        log.append(row)
    if best.update(step, result, runner, state, {"step": step, "data": train_data.get_state(),
                                                 "config": cfg.to_dict()}):
        _log(f"best {best.metric} so far ({best.best:.4f}): checkpoint of step {step} kept in {best.directory}")
    return result


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)
