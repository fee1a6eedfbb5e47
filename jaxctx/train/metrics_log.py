"""Where a run's metrics rows go: `metrics.jsonl` (the record), TensorBoard event files, and W&B if configured.

Only process 0 opens a `MetricsLog`; the other processes get a disabled one. A row is a flat dict with `step`:
training rows (`loss`, `lr`, `grad_norm`, throughput, `mfu`, memory) and validation rows (`val_loss`,
`val_perplexity`, `val_tokens`). Every numeric column becomes a scalar under the same name in TensorBoard and W&B,
so the three never disagree on what a number is called.

TensorBoard: tensorboardX writes `<workdir>/tensorboard/events.out.tfevents.*` (local or `gs://`, through
google-cloud-storage). A resumed run opens a new event file that starts with a purge marker at the first step it
will log again (`purge_step`): TensorBoard then hides the rows a killed run wrote past the restored checkpoint,
the same rows `metrics.jsonl` drops.

W&B (`train.wandb_project`, `train.wandb_mode` online | offline | disabled): one W&B run per workdir (its id is
derived from the workdir path, and a restart resumes it), the config as the run's config. W&B refuses steps below
one it has seen, so after a resume from an older checkpoint it keeps the killed run's values for the re-run steps
(metrics.jsonl and TensorBoard have the re-run's).
"""

from __future__ import annotations

import hashlib
import math
import sys

from jaxctx import storage
from jaxctx.errors import ConfigError
from jaxctx.train import workdir as workdir_lib

TENSORBOARD_DIR = "tensorboard"


def _scalars(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: its writer module imports torch when it is installed
    (~1.2 s of every run's startup on 2 cores) only to accept torch tensors, and the log writes Python floats.
    Torch is hidden from that one import unless something has loaded it already."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX takes its numpy-only path
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """Append rows to metrics.jsonl and mirror their scalars to TensorBoard (and W&B). `enabled=False`: no-op."""

    def __init__(self, cfg, workdir: str, *, start: int, enabled: bool):
        self.path = storage.join(workdir, workdir_lib.METRICS_FILE)
        self.enabled = enabled
        self._tensorboard = self._wandb = None
        if not enabled:
            return
        SummaryWriter = _summary_writer_class()
        # purge_step: TensorBoard hides events at or after it from earlier files (a killed run's rows past the
        # restored step); flush_secs bounds what a preemption loses of the event file.
        self._tensorboard = SummaryWriter(logdir=storage.join(workdir, TENSORBOARD_DIR),
                                          purge_step=start + 1 if start > 0 else None, flush_secs=30)
        if cfg.train.wandb_project and cfg.train.wandb_mode != "disabled":
            self._wandb = _start_wandb(cfg, workdir)

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        workdir_lib.append_metrics(self.path, row)
        scalars = _scalars(row)
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, value, global_step=row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    def has_row(self, step: int, key: str) -> bool:
        return self.enabled and workdir_lib.has_row(self.path, step, key)

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            record = _gcs_record_writer(self._tensorboard)
            self._tensorboard.close()
            if record is not None:  # close() uploaded everything; its __del__ would upload it all again
                record.close = lambda: None
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _gcs_record_writer(writer):
    """The gs:// record writer under a tensorboardX SummaryWriter, or None. Its `__del__` uploads the whole buffer
    again, and tensorboardX's atexit hook keeps it alive until interpreter exit, where the upload can only retry
    for 120 s if the endpoint is gone (a stopped emulator, a lost network)."""
    events = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_ev_writer", None)
    record = getattr(getattr(events, "_py_recordio_writer", None), "_writer", None)
    return record if type(record).__name__ == "GCSRecordWriter" else None


def wandb_run_id(workdir: str) -> str:
    """The W&B run id of a workdir: every restart of the run logs to the same W&B run."""
    return "jaxctx-" + hashlib.sha256(workdir.rstrip("/").encode()).hexdigest()[:16]


def check_available(cfg) -> None:
    """ConfigError if W&B is configured but not installed (checked before a run writes anything)."""
    if cfg.train.wandb_project and cfg.train.wandb_mode != "disabled":
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"train.wandb_project={cfg.train.wandb_project} needs the wandb package: pip "
                              f"install wandb (or set train.wandb_mode=disabled)")


def _start_wandb(cfg, workdir: str):
    import wandb

    return wandb.init(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode, id=wandb_run_id(workdir),
                      resume="allow", config=cfg.to_dict(), name=workdir.rstrip("/").rsplit("/", 1)[-1])
