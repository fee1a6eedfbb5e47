"""The hardware columns of metrics.jsonl: mfu against a direct computation, device memory where reported."""

import json
import os

import jax
import numpy as np
import pytest

from jaxctx import config as config_lib
from jaxctx.checkpoint import load_params
from jaxctx.train.loop import run
from jaxctx.train.throughput import memory_columns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FAST = ("train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "data.validation_fraction=0",
        "data.max_documents=20", "data.seq_len=64", "model.num_layers=1")


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mfu_is_model_flops_per_second_over_the_stated_peak(tmp_path):
    """mfu = tokens/s x (6N + 6 L H Q T) / peak, with N counted here from the saved params (every matmul weight:
    all params but the token and position tables, plus the tied head's V x D once) -- not by the loop's code."""
    peak = 0.05  # TFLOP/s: the rate this test states for the CPU host (CPU has no data-sheet peak)
    cfg = config_lib.load(TINY, [*FAST, f"train.peak_tflops={peak}"])
    assert run(cfg, str(tmp_path), devices=jax.devices()[:2]) == 0  # 2 fake devices: one host, counted once
    params, _ = load_params(tmp_path)
    sizes = {path: leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    tables = sum(n for path, n in sizes.items() if jax.tree_util.keystr(path[:1]) in ("['token_embed']",
                                                                                       "['pos_embed']"))
    m, t = cfg.model, cfg.data.seq_len
    n_matmul = sum(sizes.values()) - tables + m.vocab_size * m.d_model
    per_token = 6 * n_matmul + 6 * m.num_layers * m.num_heads * (m.d_model // m.num_heads) * t  # causal: half of 12
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / (peak * 1e12), rel=1e-9)
        assert "memory_in_use_mib" not in r  # the CPU backend reports no memory stats


def test_no_mfu_without_a_peak_on_cpu(tmp_path):
    assert run(config_lib.load(TINY, list(FAST)), str(tmp_path), devices=jax.devices()[:1]) == 0
    assert all("mfu" not in r and np.isfinite(r["tokens_per_sec_per_device"]) for r in rows(tmp_path))


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_memory_columns_take_the_largest_device_and_skip_silent_ones():
    devices = [_Device({"bytes_in_use": 3 << 20, "peak_bytes_in_use": 5 << 20}), _Device(None),
               _Device({"bytes_in_use": 7 << 20, "peak_bytes_in_use": 4 << 20}), _Device(RuntimeError("no stats"))]
    assert memory_columns(devices) == {"memory_in_use_mib": 7.0, "memory_peak_mib": 5.0}
    assert memory_columns([_Device(None)]) == {}
    assert memory_columns(jax.devices("cpu")[:1]) == {}  # what this backend says


def test_peak_tflops_must_be_positive():
    with pytest.raises(config_lib.ConfigError, match="train.peak_tflops=0.0 must be a positive"):
        config_lib.load(TINY, ["train.peak_tflops=0"])
