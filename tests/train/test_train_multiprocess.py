"""Several JAX processes on one machine (jax.distributed over localhost, gloo collectives) train like one process.

Each data group (usually one process; the processes sharing rows when a sequence axis spans processes) reads
only its share of the documents, so the single-process reference feeds the same global batches: group 0's rows
then group 1's, built by the same pipeline with process_index 0 and 1.
"""

import json
import os
import random
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

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


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("localhost", port))
        except OSError:
            return False
        return True


def _launch(workdir, processes: int, devices_per_process: int, overrides,
            slurm: bool = False) -> list[tuple[int, str, str]]:
    """Run train.py as `processes` jax.distributed processes of `devices_per_process` fake CPU devices each;
    [(exit code, stdout, stderr)] per process. slurm: no parallel.* keys, only the variables `srun` sets (one
    node, one task per process); JAX's SLURM detection derives the coordinator from them."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONUNBUFFERED="1")
    if slurm:  # the coordinator port is 61440 + SLURM_JOB_ID % 4096: pick a job id whose port is free
        port = next(p for p in random.Random().sample(range(61440, 65536), 200) if _port_free(p))
        env.update(SLURM_JOB_ID=str(1_000_000 * 4096 + port - 61440), SLURM_NTASKS=str(processes),
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_NNODES="1",
                   SLURM_JOB_NODELIST="localhost")
    procs = []
    for i in range(processes):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(workdir)]
        cluster = () if slurm else (f"parallel.coordinator_address=localhost:{port}",
                                    f"parallel.num_processes={processes}", f"parallel.process_id={i}")
        for o in (*overrides, *cluster):
            cmd += ["--set", o]
        proc_env = dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)) if slurm else env
        procs.append(subprocess.Popen(cmd, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.returncode, *out) for p, out in ((p, p.communicate(timeout=300)) for p in procs)]


def _metrics(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


class _BothShards:
    """Iterator over the concatenation of two data groups' batches (the global batch of a job with two groups)."""

    def __init__(self, cfg, split, **_):
        self.shards = [pipeline.DataIterator(cfg, split, process_index=i, process_count=2) for i in range(2)]

    def __next__(self):
        parts = [next(it) for it in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def stats(self):
        return self.shards[0].stats()

    def get_state(self):
        return self.shards[0].get_state()


def _assert_same_steps(multi, single, steps):
    """The multi-process run logged the same steps as the single-process one, with loss and grad_norm within
    1e-5."""
    assert _metrics(multi, "step") == _metrics(single, "step") == list(range(1, steps + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(_metrics(multi, key), _metrics(single, key), rtol=1e-5, atol=1e-5, err_msg=key)


def _assert_ok(results):
    for code, _, err in results:
        assert code == 0, err


def test_two_processes_match_one(tmp_path, monkeypatch):
    results = _launch(tmp_path / "multi", 2, 1, ARGS)
    _assert_ok(results)
    # Logs and metrics come from process 0 only.
    assert "workdir:" in results[0][1] and "workdir:" not in results[1][1]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3", "6"]
    assert len(os.listdir(tmp_path / "multi" / "tensorboard")) == 1  # one event file: process 0's

    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(ARGS)), str(tmp_path / "single"), devices=jax.devices()[:2]) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 6)


@pytest.mark.slow
def test_srun_environment_starts_two_processes_like_one(tmp_path, monkeypatch):
    """What `slurm/train.sbatch` relies on: train.py under the variables srun sets (and no parallel.* keys) joins
    one jax.distributed job through JAX's SLURM detection and trains exactly as one process with both shards."""
    args = ("train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "data.validation_fraction=0")
    results = _launch(tmp_path / "multi", 2, 1, args, slurm=True)
    _assert_ok(results)
    assert "workdir:" in results[0][1] and "workdir:" not in results[1][1]  # process 1 knows it is not 0
    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(args)), str(tmp_path / "single"), devices=jax.devices()[:2]) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 3)


CP_ARGS = ("train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "data.validation_fraction=0")


@pytest.mark.slow
def test_a_sequence_axis_over_two_processes_trains_and_resumes_like_one(tmp_path):
    """parallel.sequence=8 over 2 processes x 4 devices: both processes are one data group and load the same
    rows (the whole batch), each device takes its length shards. Steps 1-2, a stop, then steps 3-4 resumed from
    the checkpoint equal 4 uninterrupted steps of one 8-device process."""
    args = (*CP_ARGS, "parallel.sequence=8")
    _assert_ok(_launch(tmp_path / "multi", 2, 4, (*args, "train.stop_after=2")))
    assert _metrics(tmp_path / "multi", "step") == [1, 2]
    results = _launch(tmp_path / "multi", 2, 4, args)
    _assert_ok(results)
    assert "resumed from" in results[0][2] and "at step 2" in results[0][2]

    assert run(config_lib.load(TINY, list(args)), str(tmp_path / "single")) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 4)


@pytest.mark.slow
def test_sequence_groups_spanning_processes_load_their_group_rows(tmp_path, monkeypatch):
    """data=2 x sequence=4 over 4 processes x 2 devices: processes {0, 1} hold batch rows 0-3 and {2, 3} rows
    4-7, so each pair is one data group loading the group's share of the documents. Equals one 8-device process
    fed group 0's rows then group 1's."""
    args = (*CP_ARGS[1:], "train.steps=3", "parallel.data=2", "parallel.sequence=4")
    _assert_ok(_launch(tmp_path / "multi", 4, 2, args))

    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(args)), str(tmp_path / "single")) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 3)


def test_rows_shared_in_part_by_two_processes_are_refused_before_writing(tmp_path):
    """2 processes x 3 devices with parallel.sequence=2: the middle sequence pair has a device of each process,
    so process 0 holds row blocks 0-1 and process 1 blocks 1-2, which no data split can feed. Both processes say
    so in one line naming the keys (exit 2), and nothing is written."""
    results = _launch(tmp_path / "run", 2, 3, (*ARGS, "parallel.sequence=2"))
    for code, _, err in results:
        assert code == 2, err
        assert "Traceback" not in err
        [line] = [x for x in err.splitlines() if x.startswith("train.py: error: ")]
        assert "processes [0, 1] share some batch rows but not all" in line, line
        assert "parallel.sequence x parallel.tensor = 2" in line, line
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
