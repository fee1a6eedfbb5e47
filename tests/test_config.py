"""Config loading: YAML + overrides, types, unknown keys with suggestions, clear errors."""

import re

import pytest
import yaml

from jaxctx import config as config_lib
from jaxctx.config import ConfigError


def test_defaults_resolve_max_positions_from_seq_len():
    cfg = config_lib.load(None, ["data.seq_len=300"])
    assert cfg.model.max_positions == 300


def test_overrides_are_typed_yaml_values(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  d_model: 64\n  num_heads: 2\ntrain:\n  learning_rate: 1.0e-3\n")
    cfg = config_lib.load(path, ["train.learning_rate=1e-4", "model.rope_scaling=null", "train.init_from=runs/a",
                                 "model.scan_layers=false"])
    assert cfg.model.d_model == 64 and cfg.train.learning_rate == 1e-4 and cfg.model.scan_layers is False
    assert cfg.train.init_from == "runs/a"
    # The resolved config written to a workdir loads back to the same value.
    out = tmp_path / "resolved.yaml"
    out.write_text(config_lib.to_yaml(cfg))
    assert config_lib.load(out) == cfg


@pytest.mark.parametrize("overrides,message", [
    (["modle.d_model=3"], "unknown config section 'modle'; did you mean 'model'"),
    (["model.d_modl=3"], "did you mean 'd_model'"),
    (["model.d_model=1.5"], "must be an integer"),
    (["model.scan_layers=3"], "true or false"),
    (["model.family=gpt3"], "gpt2, llama, bert"),
    (["model.num_kv_heads=3", "model.family=llama"], "multiple of model.num_kv_heads=3"),
    (["data.seq_len=1"], "data.seq_len=1 must be >= 2"),
    (["data.seq_len=4096", "model.max_positions=1024"], "exceeds model.max_positions=1024"),
    (["train.batch_size=6", "train.grad_accum=4"], "divisible by train.grad_accum=4"),
    (["model.num_layers=12", "model.remat_policy=full", "model.remat_group_size=5"],
     "model.remat_group_size=5 must divide model.num_layers=12"),
    (["model.remat_group_size=2"], "needs model.scan_layers=true and a model.remat_policy other than none"),
    (["steps=3"], "section.key"),
    (["train.steps"], "section.key=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        config_lib.load(listy)


@pytest.mark.parametrize("overrides, message", [
    (["model.task=sequence_classification"], "model.num_labels=0 must be a positive integer"),
    (["model.task=sequence_classification", "model.num_labels=3", "model.problem_type=regression"],
     "model.num_labels=3 with model.problem_type=regression"),
    (["model.task=sequence_classification", "model.num_labels=1", "model.problem_type=single_label"],
     "classification needs model.num_labels >= 2"),
    (["model.task=token_classification", "model.num_labels=3", "model.problem_type=multi_label"],
     "model.problem_type=multi_label applies to sequence_classification"),
    (["model.num_labels=3"], "model.num_labels=3 needs a task model"),
    (["model.task=sequence_classification", "model.num_labels=2", "model.id2label={a: neg, 1: pos}"],
     "model.id2label keys must be label ids"),
    (["model.task=sequence_classification", "model.num_labels=2", "model.id2label=[neg, neg]"], "repeats a name"),
    (["model.task=sequence_classification", "model.num_labels=2", "model.nsp_head=true", "model.family=bert"],
     "model.nsp_head=true"),
])
def test_task_config_errors_name_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.load(None, overrides)


def test_task_config_defaults_and_label_names():
    cfg = config_lib.load(None, ["model.task=sequence_classification", "model.num_labels=1"])
    assert cfg.model.problem == "regression"  # HF's rule for num_labels == 1
    cfg = config_lib.load(None, ["model.task=sequence_classification", "model.num_labels=2",
                                 "model.id2label={1: pos, 0: neg}"])
    assert cfg.model.problem == "single_label" and cfg.model.id2label == ("neg", "pos")
    again = config_lib.from_dict(yaml.safe_load(config_lib.to_yaml(cfg))).resolved()
    assert again == cfg and hash(again.model) == hash(cfg.model)
