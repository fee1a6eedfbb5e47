"""The training job end to end on the tiny config (in-process, CPU)."""

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

# Tests here compile the same steps again and again: tests/conftest.py's persistent cache compiles each once.
pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def tiny(*overrides):
    return config_lib.load(TINY, list(overrides))


def read_all_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_metrics(workdir):
    """The training rows (validation passes are rows of their own, with val_* keys and no loss)."""
    return [r for r in read_all_rows(workdir) if "loss" in r]


def val_rows(workdir):
    return [r for r in read_all_rows(workdir) if "val_loss" in r]


def test_loss_decreases_and_workdir_is_complete(tmp_path, capsys):
    cfg = tiny("train.steps=40", "train.log_every=1")
    assert run(cfg, str(tmp_path), devices=jax.devices()[:1]) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 1.0, (first, last)
    assert config_lib.load(tmp_path / "config.yaml") == cfg  # the saved config is the resolved one
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "40"]
    err = capsys.readouterr()
    assert "validation at step 40: loss" in err.err and str(tmp_path) in err.out
    [val] = val_rows(tmp_path)  # recorded as printed: the final pass, a row of its own
    assert val["step"] == 40 and val["val_tokens"] > 0
    assert f"loss {val['val_loss']:.4f}  perplexity {val['val_perplexity']:.2f}" in err.err
    assert val["val_perplexity"] == pytest.approx(np.exp(val["val_loss"]))


def test_validation_rows_on_resume_equal_an_uninterrupted_run(tmp_path, capsys):
    """train.eval_every passes are rows of metrics.jsonl; stopped at step 4 and resumed, the training and the
    validation rows equal the uninterrupted run's bit for bit, and starting the finished run again evaluates it
    but does not log its validation twice."""
    base = ("train.steps=8", "train.log_every=1", "train.checkpoint_every=4", "train.eval_every=4",
            "data.max_documents=20", "data.seq_len=64", "model.num_layers=1")
    one = jax.devices()[:1]
    assert run(tiny(*base), str(tmp_path / "full"), devices=one) == 0
    assert run(tiny(*base, "train.stop_after=4"), str(tmp_path / "part"), devices=one) == 0
    assert [r["step"] for r in val_rows(tmp_path / "part")] == [4]
    assert run(tiny(*base), str(tmp_path / "part"), devices=one) == 0
    want, got = read_all_rows(tmp_path / "full"), read_all_rows(tmp_path / "part")
    assert [r["step"] for r in val_rows(tmp_path / "full")] == [4, 8]
    keys = ("step", "loss", "grad_norm", "lr", "val_loss", "val_perplexity", "val_tokens")
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want]
    capsys.readouterr()
    assert run(tiny(*base), str(tmp_path / "part"), devices=one) == 0
    assert "validation at step 8" in capsys.readouterr().err
    assert read_all_rows(tmp_path / "part") == got


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


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
def test_resume_after_sigkill_continues_on_the_next_batch(tmp_path):
    """A run killed (SIGKILL) after its step-20 checkpoint and resumed equals the uninterrupted run step for step."""
    args = ("train.steps=40", "train.log_every=1", "train.checkpoint_every=20", "data.validation_fraction=0")
    full = _train_subprocess(tmp_path / "full", *args)
    part = _train_subprocess(tmp_path / "part", *args)
    _wait_for_checkpoint(part, tmp_path / "part", 20)
    part.send_signal(signal.SIGKILL)
    part.wait()
    assert full.wait() == 0, full.communicate()
    resumed = _train_subprocess(tmp_path / "part", *args)
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resumed from" in err and "at step 20" in err
    got, want = read_metrics(tmp_path / "part"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in got] == list(range(1, 41))
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in want])
    np.testing.assert_array_equal([r["grad_norm"] for r in got], [r["grad_norm"] for r in want])


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    ("model.family=gpt2",),
    ("model.family=llama", "model.num_kv_heads=1"),
    ("model.family=gpt2", "model.num_layers=4", "model.attention=blockwise", "model.mlp_chunk=32",
     "model.loss_chunk=32", "model.remat_policy=full", "model.remat_group_size=2"),
], ids=["gpt2", "llama-gqa", "gpt2-long-context-path"])
def test_sharded_mesh_matches_one_device(tmp_path, model):
    """data x fsdp x tensor = 2 x 2 x 2 over 8 fake CPU devices gives the 1-device losses (GQA with a single
    k/v head, which cannot be split over the tensor axis, included; and the long-context path: blockwise
    attention, chunked MLP and loss, grouped remat)."""
    assert len(jax.devices()) >= 8
    base = ("train.steps=6", "train.log_every=1", "model.num_heads=4", "data.validation_fraction=0", *model)
    assert run(tiny(*base), str(tmp_path / "one"), devices=jax.devices()[:1]) == 0
    sharded = tiny(*base, "parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2")
    assert run(sharded, str(tmp_path / "eight"), devices=jax.devices()[:8]) == 0
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "eight")],
                               [r["loss"] for r in read_metrics(tmp_path / "one")], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_restore_on_a_different_device_count(tmp_path):
    base = ("train.log_every=1", "train.checkpoint_every=4", "model.num_heads=4", "data.validation_fraction=0")
    ref = tmp_path / "ref"
    assert run(tiny("train.steps=8", *base), str(ref), devices=jax.devices()[:1]) == 0
    work = tmp_path / "work"
    assert run(tiny("train.steps=8", "train.stop_after=4", *base, "parallel.fsdp=4", "parallel.data=1"), str(work),
               devices=jax.devices()[:4]) == 0
    assert run(tiny("train.steps=8", *base, "parallel.data=2"), str(work), devices=jax.devices()[:2]) == 0
    np.testing.assert_allclose([r["loss"] for r in read_metrics(work)], [r["loss"] for r in read_metrics(ref)],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pmap_matches_jit(tmp_path):
    base = ("train.steps=5", "train.log_every=1", "data.validation_fraction=0")
    assert run(tiny(*base), str(tmp_path / "jit"), devices=jax.devices()[:4]) == 0
    assert run(tiny(*base, "parallel.mode=pmap"), str(tmp_path / "pmap")) == 0
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "pmap")],
                               [r["loss"] for r in read_metrics(tmp_path / "jit")], rtol=1e-5, atol=1e-5)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    base = ("train.steps=4", "train.log_every=1", "data.validation_fraction=0")
    one = jax.devices()[:1]
    assert run(tiny(*base), str(tmp_path / "a"), devices=one) == 0
    assert run(tiny(*base, "train.grad_accum=4"), str(tmp_path / "b"), devices=one) == 0
    np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "b")],
                               [r["loss"] for r in read_metrics(tmp_path / "a")], rtol=1e-5, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The loop stops on the first non-finite step, names it, logs nothing for it, and the state the step returned
    is bit-identical to the state it was given (the guard; the loop alone would pass without it, since it never
    saves after a bad step); the last checkpoint holds the last good state."""
    from jaxctx.checkpoint import load_params
    from jaxctx.train.runner import JitRunner

    seen = []  # per step: (state given, state returned, finite), host copies (the jit step donates its input)
    original = JitRunner.step

    def recording_step(self, state, batch):
        before = _host(state)
        state, metrics = original(self, state, batch)
        seen.append((before, _host(state), bool(metrics["finite"])))
        return state, metrics

    monkeypatch.setattr(JitRunner, "step", recording_step)
    # Warmup keeps step 1 at lr=0 (a clean checkpoint at step 2); lr ~1e11 then blows the params up.
    cfg = tiny("train.steps=20", "train.checkpoint_every=2", "train.learning_rate=1e12", "train.grad_clip=0",
               "train.warmup_steps=6", "train.log_every=1", "data.validation_fraction=0")
    assert run(cfg, str(tmp_path), devices=jax.devices()[:1]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    assert [finite for _, _, finite in seen[:bad_step]] == [True] * (bad_step - 1) + [False]
    given, returned, _ = seen[bad_step - 1]
    for name in ("params", "opt_state"):
        a, b = getattr(given, name), getattr(returned, name)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), name
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, bad_step))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps and steps[-1] < bad_step
    saved, _ = load_params(tmp_path / "checkpoints", step=steps[-1])
    want = seen[steps[-1] - 1][1].params  # the state after the last checkpointed step
    assert jax.tree.structure(saved) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("override,message", [
    ("model.d_modl=64", "did you mean 'd_model'"),
    ("train.batch_size=7", "divisible by the data-parallel size"),
    ("parallel.data=3", "must equal the device count"),
    ("model.num_heads=3", "divisible by model.num_heads"),
    ("train.steps=0", "positive integer"),
    ("model.attention_block_q=4096", "exceeds data.seq_len=128"),
])
def test_config_errors_are_clear(tmp_path, override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        run(tiny(override), str(tmp_path), devices=jax.devices()[:2])


def test_jaxctx_train_cli(tmp_path, capsys):
    """`jaxctx train` is the same job: here on all 8 fake devices (data axis fills the mesh)."""
    from jaxctx.cli import main
    args = ["train", "--config", TINY, "--workdir", str(tmp_path), "--set", "train.steps=2",
            "--set", "data.validation_fraction=0"]
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [2]
    assert "'data': 8" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--set", "model.d_modl=3"]) == 2
    assert "did you mean 'd_model'" in capsys.readouterr().err


def test_step_time_is_each_steps_own_wall_time(tmp_path, monkeypatch):
    """Measured against an independent clock: consecutive rows' step_time_s equal the wall time between their
    appends to metrics.jsonl, and they sum to no more than the run's wall time. (Timing each step from its
    dispatch, with metrics fetched one step late, spanned two steps and halved tokens_per_sec.)"""
    from jaxctx.train import loop, workdir as workdir_lib

    pause = 0.15  # every step takes at least this long, so a time spanning two steps is off by >= 0.15 s
    make_runner = loop.make_runner

    def slow_runner(cfg, mesh):
        runner = make_runner(cfg, mesh)
        step = runner.step

        def slow_step(state, batch):
            time.sleep(pause)
            return step(state, batch)

        runner.step = slow_step
        return runner

    appended = []
    append = workdir_lib.append_metrics

    def timed_append(path, row):
        if "loss" in row:  # training rows (the final validation pass appends a row of its own)
            appended.append(time.perf_counter())
        append(path, row)

    monkeypatch.setattr(loop, "make_runner", slow_runner)
    monkeypatch.setattr(workdir_lib, "append_metrics", timed_append)
    steps = 8
    started = time.perf_counter()
    assert run(tiny(f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=4"), str(tmp_path),
               devices=jax.devices()[:1]) == 0
    wall = time.perf_counter() - started
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    times = [r["step_time_s"] for r in rows]
    between_appends = np.diff(appended)
    # the code between a fetch and its append is microseconds; a step spanning two would be off by >= pause
    np.testing.assert_allclose(times[1:], between_appends, atol=0.05)
    assert steps * pause <= sum(times) <= wall  # every step's pause lies between the clock's start and the last fetch
    for r in rows:
        assert r["tokens_per_sec"] == pytest.approx(cfg_tokens_per_step() / r["step_time_s"])
        assert r["tokens_per_sec_per_device"] == pytest.approx(r["tokens_per_sec"])  # one device


def cfg_tokens_per_step():
    cfg = tiny()
    return cfg.train.batch_size * cfg.data.seq_len


def test_bert_pretraining_with_nsp_logs_nsp_metrics(tmp_path):
    cfg = tiny("model.family=bert", "model.nsp_head=true", "data.nsp=true", "train.steps=3", "train.log_every=1")
    assert run(cfg, str(tmp_path), devices=jax.devices()[:2]) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["nsp_loss"]) and 0.3 < r["nsp_loss"] < 3.0  # ~ln 2 for an untrained head
        assert 0.0 <= r["nsp_accuracy"] <= 1.0 and np.isfinite(r["loss"]) and r["loss"] > r["nsp_loss"]
