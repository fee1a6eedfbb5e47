"""Two JAX processes on one machine (jax.distributed over localhost, gloo collectives) train like one process.

Each process reads only its share of the documents, so the single-process reference feeds the same global
batches: process 0's rows then process 1's, built by the same pipeline with process_index 0 and 1.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxctx import config as config_lib
from jaxctx.data import pipeline
from jaxctx.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
ARGS = ("train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "data.validation_fraction=0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _BothShards:
    """Iterator over the concatenation of the two processes' batches (the global batch of a 2-process job)."""

    def __init__(self, cfg, split, **_):
        self.shards = [pipeline.DataIterator(cfg, split, process_index=i, process_count=2) for i in range(2)]

    def __next__(self):
        parts = [next(it) for it in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def stats(self):
        return self.shards[0].stats()

    def get_state(self):
        return self.shards[0].get_state()


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one(tmp_path, monkeypatch):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    procs = []
    for i in range(2):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(tmp_path / "multi")]
        for o in (*ARGS, f"parallel.coordinator_address=localhost:{port}", "parallel.num_processes=2",
                  f"parallel.process_id={i}"):
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    # Logs and metrics come from process 0 only.
    assert "workdir:" in outputs[0][0] and "workdir:" not in outputs[1][0]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3", "6"]
    assert len(os.listdir(tmp_path / "multi" / "tensorboard")) == 1  # one event file: process 0's

    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(ARGS)), str(tmp_path / "single"), devices=jax.devices()[:2]) == 0
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-5, atol=1e-5)


def test_a_sequence_axis_across_processes_is_refused_before_writing(tmp_path):
    """Each process feeds its own rows, so a sequence split over two hosts cannot be fed yet: both processes say
    so in one line naming the keys (exit 2), and nothing is written."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    procs = []
    for i in range(2):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(tmp_path / "run")]
        for o in (*ARGS, "parallel.sequence=2", f"parallel.coordinator_address=localhost:{port}",
                  "parallel.num_processes=2", f"parallel.process_id={i}"):
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
        assert "Traceback" not in err
        [line] = [x for x in err.splitlines() if x.startswith("train.py: error: ")]
        assert "parallel.sequence=2" in line and "spans processes [0, 1]" in line, line
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
