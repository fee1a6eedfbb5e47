"""gs:// workdirs against a GCS API on localhost (tests/gcs_emulator.py: gcp-storage-emulator), not a mock.

What is tested here: the workdir's own files on gs:// (config record, resume planning, metrics.jsonl appends and
trimming, atomic writes that leave no temporary object and never overwrite a record) and the TensorBoard event
files tensorboardX writes to the bucket, read back with TensorBoard's reader.

What the emulator cannot serve (so training end to end on gs://, which needs Orbax checkpoints, is not run here):
TensorStore's OCDBT checkpoint writes read `manifest.ocdbt` back with a media GET
(`GET /storage/v1/b/BUCKET/o/OBJECT?alt=media`) and need the object generation from the response's
`x-goog-generation` header for their conditional (ifGenerationMatch) commit; gcp-storage-emulator sends no such
header (and ignores ifGenerationMatch), so the save fails with "Malformed StorageGeneration". Nor does it serve
object copies (`POST .../rewriteTo/...` answers 501), which moving an unrestorable checkpoint aside on gs:// uses.
"""

import json
import os

import numpy as np
import pytest
import yaml

from gcs_emulator import BUCKET, emulated_gcs
from jaxctx import config as config_lib
from jaxctx import storage
from jaxctx.errors import WorkdirError
from jaxctx.train import workdir as workdir_lib
from jaxctx.train.metrics_log import MetricsLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with emulated_gcs(tmp_path_factory.mktemp("gcs") / "emulator.log") as emulator:
        yield emulator


def test_storage_primitives_on_gs(gcs):
    root = f"gs://{BUCKET}/primitives"
    storage.write_atomic(f"{root}/a.txt", "one")
    storage.write_atomic(f"{root}/a.txt", "two")  # replaced whole
    storage.append_text(f"{root}/log.jsonl", "x\n")
    storage.append_text(f"{root}/log.jsonl", "y\n")
    assert storage.read_text(f"{root}/a.txt") == "two"
    assert storage.read_text(f"{root}/log.jsonl") == "x\ny\n"
    assert storage.listdir(root) == ["a.txt", "log.jsonl"]  # no temporary objects left behind
    assert storage.isfile(f"{root}/a.txt") and not storage.isdir(f"{root}/a.txt")
    storage.write_atomic(f"{root}/dir/sub/b.bin", b"\x00\x01")
    assert storage.isdir(f"{root}/dir") and storage.read_bytes(f"{root}/dir/sub/b.bin") == b"\x00\x01"
    assert storage.listdir(f"gs://{BUCKET}/nothing-here") == []


def test_workdir_records_and_metrics_on_gs(gcs):
    workdir = f"gs://{BUCKET}/runs/tiny"
    cfg = config_lib.load(TINY, ["train.steps=4"])
    plan = workdir_lib.plan_start(cfg, workdir)
    assert plan.record is None
    assert workdir_lib.commit_start(plan, cfg, 0) == f"{workdir}/config.yaml"
    assert config_lib.from_dict(yaml.safe_load(storage.read_text(f"{workdir}/config.yaml"))).resolved() == cfg
    path = f"{workdir}/metrics.jsonl"
    for step in (1, 2, 3):
        workdir_lib.append_metrics(path, {"step": step, "loss": 1.0 / step})
    workdir_lib.append_metrics(path, {"step": 2, "val_loss": 0.5})
    assert workdir_lib.has_row(path, 2, "val_loss") and not workdir_lib.has_row(path, 3, "val_loss")
    workdir_lib.truncate_metrics(path, 2)  # a resume from step 2 drops the rows logged after it
    assert [json.loads(x)["step"] for x in storage.read_text(path).splitlines()] == [1, 2, 2]
    # A continued run with an allowed change writes a second record; the first is never rewritten.
    longer = config_lib.load(TINY, ["train.steps=8"])
    again = workdir_lib.plan_start(longer, workdir)
    assert again.changed == {"train.steps": (4, 8)}
    first = storage.read_bytes(f"{workdir}/config.yaml")
    assert workdir_lib.commit_start(again, longer, 2) == f"{workdir}/config.resumed-2.yaml"
    assert storage.read_bytes(f"{workdir}/config.yaml") == first
    assert workdir_lib.config_records(workdir) == [f"{workdir}/config.yaml", f"{workdir}/config.resumed-2.yaml"]
    with pytest.raises(WorkdirError, match="model.d_model: 64 in the workdir, 128 requested"):
        workdir_lib.plan_start(config_lib.load(TINY, ["model.d_model=128"]), workdir)
    assert not [n for n in storage.listdir(workdir) if ".tmp" in n]


def test_tensorboard_files_in_the_bucket(gcs, tmp_path):
    """MetricsLog on a gs:// workdir: metrics.jsonl rows and the event file tensorboardX uploads agree."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = f"gs://{BUCKET}/runs/tb"
    cfg = config_lib.load(TINY, [])
    log = MetricsLog(cfg, workdir, start=0, enabled=True)
    want = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s} for s in (1, 2, 3)] + [{"step": 3, "val_loss": 0.75}]
    for row in want:
        log.append(row)
    log.close()
    assert [json.loads(x) for x in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()] == want
    [name] = storage.listdir(f"{workdir}/tensorboard")
    storage.copy_file(f"{workdir}/tensorboard/{name}", str(tmp_path / name))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("loss", "lr", "val_loss"):
        points = [(r["step"], r[tag]) for r in want if tag in r]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        np.testing.assert_array_equal([v for _, v in got], np.float32([v for _, v in points]))
