"""Several JAX processes on one machine (jax.distributed over localhost, gloo collectives) train like one process.

Each data group (usually one process; the processes sharing rows when a sequence axis spans processes) reads
only its share of the documents, so the single-process reference feeds the same global batches: group 0's rows
then group 1's, built by the same pipeline with process_index 0 and 1.
"""

import json
import os
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


def _launch(workdir, processes: int, devices_per_process: int, overrides, cache_env=None
            ) -> list[tuple[int, str, str]]:
    """Run train.py as `processes` jax.distributed processes of `devices_per_process` fake CPU devices each (with
    the module's persistent compilation cache when `cache_env` is given); [(exit code, stdout, stderr)] per
    process."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONUNBUFFERED="1", **(cache_env or {}))
    procs = []
    for i in range(processes):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(workdir)]
        cluster = (f"parallel.coordinator_address=localhost:{port}", f"parallel.num_processes={processes}",
                   f"parallel.process_id={i}")
        for o in (*overrides, *cluster):
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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


def test_two_processes_match_one(tmp_path, monkeypatch, compilation_cache):
    results = _launch(tmp_path / "multi", 2, 1, ARGS, compilation_cache)
    _assert_ok(results)
    # Logs and metrics come from process 0 only.
    assert "workdir:" in results[0][1] and "workdir:" not in results[1][1]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3", "6"]
    assert len(os.listdir(tmp_path / "multi" / "tensorboard")) == 1  # one event file: process 0's

    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(ARGS)), str(tmp_path / "single"), devices=jax.devices()[:2]) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 6)


CP_ARGS = ("train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "data.validation_fraction=0")


@pytest.mark.slow
def test_a_sequence_axis_over_two_processes_trains_and_resumes_like_one(tmp_path, compilation_cache):
    """parallel.sequence=8 over 2 processes x 4 devices: both processes are one data group and load the same
    rows (the whole batch), each device takes its length shards. Steps 1-2, a stop, then steps 3-4 resumed from
    the checkpoint equal 4 uninterrupted steps of one 8-device process."""
    args = (*CP_ARGS, "parallel.sequence=8")
    _assert_ok(_launch(tmp_path / "multi", 2, 4, (*args, "train.stop_after=2"), compilation_cache))
    assert _metrics(tmp_path / "multi", "step") == [1, 2]
    results = _launch(tmp_path / "multi", 2, 4, args, compilation_cache)
    _assert_ok(results)
    assert "resumed from" in results[0][2] and "at step 2" in results[0][2]

    assert run(config_lib.load(TINY, list(args)), str(tmp_path / "single")) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 4)


@pytest.mark.slow
def test_sequence_groups_spanning_processes_load_their_group_rows(tmp_path, monkeypatch, compilation_cache):
    """data=2 x sequence=4 over 4 processes x 2 devices: processes {0, 1} hold batch rows 0-3 and {2, 3} rows
    4-7, so each pair is one data group loading the group's share of the documents. Equals one 8-device process
    fed group 0's rows then group 1's."""
    args = (*CP_ARGS[1:], "train.steps=3", "parallel.data=2", "parallel.sequence=4")
    _assert_ok(_launch(tmp_path / "multi", 4, 2, args, compilation_cache))

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


# A stand-in for SLURM's srun: starts SLURM_NTASKS copies of its command on this machine, each with the variables
# a real srun sets for its task, and exits with the first non-zero status.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):  # srun's own options (--kill-on-bad-exit=1), then the command
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
                                         SLURM_STEP_ID="0", SLURM_STEP_NODELIST="localhost",
                                         SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS=str(n)))
         for i in range(n)]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + SLURM_JOB_ID % 4096) is free on this machine now."""
    for job_id in np.random.default_rng().permutation(4096):
        if _port_free(61440 + int(job_id)):
            return 4096 * 7 + int(job_id)
    raise AssertionError("no free port in 61440-65535")


@pytest.mark.slow
def test_slurm_sbatch_trains_like_one_process(tmp_path, monkeypatch, compilation_cache):
    """slurm/train.sbatch under a stand-in srun that starts 2 tasks with srun's variables: train.py initializes
    jax.distributed from them alone (JAX's SLURM detection: coordinator localhost, port from SLURM_JOB_ID) and
    trains equal to one process fed both tasks' rows."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    # What sbatch sets for the batch script of `--nodes=1 --ntasks-per-node=2`; srun adds the per-task rest.
    env.update(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]]),
               SLURM_JOB_ID=str(_slurm_job_id()), SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_SUBMIT_DIR=ROOT,
               VENV=str(tmp_path / "no-venv"), WORKDIR=str(tmp_path / "multi"),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1", **compilation_cache)
    args = [x for o in ARGS for x in ("--set", o)]
    done = subprocess.run(["bash", os.path.join(ROOT, "slurm", "train.sbatch"), TINY, *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "jaxctx: job" in done.stdout and done.stdout.count("workdir:") == 1  # process 0 alone logs
    monkeypatch.setattr(pipeline, "build_iterator", _BothShards)
    assert run(config_lib.load(TINY, list(ARGS)), str(tmp_path / "single"), devices=jax.devices()[:2]) == 0
    _assert_same_steps(tmp_path / "multi", tmp_path / "single", 6)


def test_slurm_batch_shell_alone_runs_one_process(monkeypatch):
    """A batch script or salloc shell has SLURM_NTASKS but no srun step: one process, no jax.distributed (JAX could
    not find the other tasks). An srun step of several tasks initializes with JAX's detection (no arguments)."""
    from jaxctx.train import loop

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for name in [k for k in os.environ if k.startswith("SLURM_")] + ["JAX_COORDINATOR_ADDRESS", "JAXCTX_DISTRIBUTED",
                                                                       "TPU_WORKER_HOSTNAMES",
                                                                       "MEGASCALE_COORDINATOR_ADDRESS"]:
        monkeypatch.delenv(name, raising=False)
    parallel = config_lib.load(TINY).parallel
    for k, v in dict(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(k, v)
    loop.maybe_initialize_distributed(parallel)
    assert calls == []
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[001-002]")
    loop.maybe_initialize_distributed(parallel)
    assert calls == [((), {})]
    monkeypatch.setenv("SLURM_NTASKS", "1")  # `srun -n1`: one process
    loop.maybe_initialize_distributed(parallel)
    assert calls == [((), {})]
