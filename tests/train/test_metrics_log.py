"""TensorBoard event files mirror metrics.jsonl: read back with TensorBoard's own reader, a resume included."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.errors import ConfigError
from jaxctx.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(logdir):
    """{tag: [(step, value), ...]} as TensorBoard shows them (its EventAccumulator, orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_equals_metrics_jsonl_across_a_resume(tmp_path):
    """Every numeric column of every metrics.jsonl row (training and validation) is a TensorBoard scalar of the
    same name at the same step. The run is resumed from step 3 after its step-6 checkpoint is lost, so the first
    event file holds steps 4-6 of a run whose rows metrics.jsonl dropped: TensorBoard must show the re-run's
    values (their step times differ), not both."""
    settings = ["train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.eval_every=3",
                "train.eval_batches=1", "train.peak_tflops=0.05", "data.validation_fraction=0.2",
                "data.max_documents=20", "data.seq_len=64", "model.num_layers=1"]
    cfg = config_lib.load(TINY, settings)
    one = jax.devices()[:1]
    assert run(cfg, str(tmp_path), devices=one) == 0
    first = rows(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run died before its last save completed
    assert run(cfg, str(tmp_path), devices=one) == 0
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 3, 4, 5, 6, 6]  # training rows, validation at 3 and 6
    assert [r["step_time_s"] for r in logged if r["step"] > 3 and "loss" in r] != \
        [r["step_time_s"] for r in first if r["step"] > 3 and "loss" in r]
    assert len(os.listdir(tmp_path / "tensorboard")) == 2  # one event file per start

    want = {}
    for r in logged:
        for key, value in r.items():
            if key != "step":
                want.setdefault(key, []).append((r["step"], value))
    assert {"loss", "lr", "grad_norm", "mfu", "step_time_s", "val_loss", "val_perplexity"} <= set(want)
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        np.testing.assert_array_equal([v for _, v in got[tag]], np.float32([v for _, v in points]), err_msg=tag)


def test_wandb_without_the_package_is_refused_before_writing(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = config_lib.load(TINY, ["train.wandb_project=demo", "train.steps=1"])
    with pytest.raises(ConfigError, match="train.wandb_project=demo needs the wandb package"):
        run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.wandb_mode='cloud' is not one of online, offline, disabled"):
        config_lib.load(TINY, ["train.wandb_mode=cloud"])


def test_the_event_writer_does_not_load_torch(tmp_path):
    """tensorboardX imports torch when it is installed (~1.2 s of every run's startup); the log hides it from that
    import and writes the same events. Torch still imports afterwards. A fresh process: this one may have torch."""
    import subprocess
    import sys

    script = f"""
import sys
from jaxctx import config as config_lib
from jaxctx.train.metrics_log import MetricsLog
log = MetricsLog(config_lib.load({TINY!r}, []), {str(tmp_path)!r}, start=0, enabled=True)
log.append({{"step": 1, "loss": 2.5}})
log.close()
assert "torch" not in sys.modules, "tensorboardX loaded torch"
import torch
print("torch", torch.__version__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("torch ")
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"loss": [(1, 2.5)]}
