"""SIGTERM / SIGINT (preemption, Ctrl-C): checkpoint at the next step boundary, exit 0, resume to the same losses.

The in-process tests deliver a real signal to this process at a chosen step (from inside the step, so the step it
lands on is deterministic), then resume the workdir and compare metrics.jsonl with an uninterrupted run, step for
step and bit for bit. The subprocess test sends SIGTERM to `train.py` from outside, as a scheduler would.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.train.loop import run
from jaxctx.train.runner import JitRunner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS, SIGNAL_AT = 10, 4
ARGS = (f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=100", "data.validation_fraction=0",
        "data.seq_len=64", "model.num_layers=1")


def tiny(*overrides):
    return config_lib.load(TINY, list(overrides))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Every in-process run here compiles the same step: tests/conftest.py's persistent cache compiles it once.
pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert run(tiny(*ARGS), str(workdir), devices=jax.devices()[:1]) == 0
    return read_metrics(workdir)


class _Unhandled(Exception):
    pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_resumes_to_the_same_losses(tmp_path, capsys, monkeypatch, uninterrupted, sig):
    # Our own handler is what the loop must replace while it runs (and put back after): if the loop did not
    # handle the signal, this one raises instead of the default action (which would kill pytest for SIGTERM).
    def unhandled(signum, _frame):
        raise _Unhandled(f"{signal.Signals(signum).name} reached the test's handler, not the loop's")

    previous = signal.signal(sig, unhandled)
    calls = []
    original = JitRunner.step

    def step_then_signal(self, state, batch):
        out = original(self, state, batch)
        calls.append(1)
        if len(calls) == SIGNAL_AT:  # delivered now, handled before the loop's step-boundary check
            os.kill(os.getpid(), sig)
        return out

    try:
        with monkeypatch.context() as m:
            m.setattr(JitRunner, "step", step_then_signal)
            assert run(tiny(*ARGS), str(tmp_path), devices=jax.devices()[:1]) == 0
        assert signal.getsignal(sig) is unhandled, "the loop did not restore the previous handler"
    finally:
        signal.signal(sig, previous)
    err = capsys.readouterr().err
    assert f"{sig.name} received: checkpoint saved at step {SIGNAL_AT}" in err
    assert os.listdir(tmp_path / "checkpoints") == [str(SIGNAL_AT)]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, SIGNAL_AT + 1))

    assert run(tiny(*ARGS), str(tmp_path), devices=jax.devices()[:1]) == 0
    assert f"at step {SIGNAL_AT}" in capsys.readouterr().err
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_array_equal([r[key] for r in got], [r[key] for r in uninterrupted], err_msg=key)


def _train_subprocess(workdir, *overrides):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(workdir)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, workdir, step, timeout=240):
    deadline = time.time() + timeout
    path = os.path.join(workdir, "checkpoints", str(step))
    while not os.path.isdir(path):  # Orbax renames the finished step directory into place
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_from_outside_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """`train.py` killed by a scheduler's SIGTERM: exit code 0, a checkpoint after the signal, and the metrics
    log ends at that step (the resume itself is checked bit for bit above)."""
    proc = _train_subprocess(tmp_path, "train.steps=100000", "train.checkpoint_every=5", "train.log_every=1",
                             "data.validation_fraction=0", *ARGS[-2:])
    _wait_for_checkpoint(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received: checkpoint saved at step" in err
    saved = int(err.split("checkpoint saved at step ")[1].split(";")[0])
    assert saved > 5 and str(saved) in os.listdir(tmp_path / "checkpoints")
    assert read_metrics(tmp_path)[-1]["step"] == saved
