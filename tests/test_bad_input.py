"""A corpus of user mistakes across every entry point: one line, exit 2, no traceback, nothing touched.

Each case builds its inputs in a fresh directory, runs an entry point in-process (`train.py`'s `main`, or
`jaxctx.cli.main`) and asserts: a non-zero exit (2), no traceback, exactly one `PROG: error: ...` line that names
the offending file / key / value, and every file that existed before is byte-identical afterwards (and nothing new
appeared). A few cases run as real subprocesses too (`test_real_processes_print_one_line`), so the console
entry points themselves are covered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

import jax
import pytest

from jaxctx import cli
from jaxctx import config as config_lib
from jaxctx.train import cli as train_cli
from jaxctx.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bad_input_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny workdir trained for 2 steps (checkpoint at step 2), copied into each case that needs one."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    cfg = config_lib.load(TINY, ["train.steps=2", "train.checkpoint_every=2", "train.log_every=1",
                                 "data.num_proc=1", f"data.cache_dir={cache_dir}", "data.max_documents=20"])
    assert loop.run(cfg, workdir, devices=jax.devices()[:1]) == 0
    return workdir


# ----------------------------------------------------------------------------------------------------------
# Case builders: each takes the case directory and returns nothing (it writes the inputs there)
# ----------------------------------------------------------------------------------------------------------

def write(rel: str, data: str | bytes) -> Callable:
    def setup(d, **_):
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return setup


def mkdir(rel: str) -> Callable:
    return lambda d, **_: os.makedirs(os.path.join(d, rel), exist_ok=True)


def copy_trained(rel: str = "run") -> Callable:
    return lambda d, trained, **_: shutil.copytree(trained, os.path.join(d, rel))


def garble_checkpoint(rel: str = "run", step: int = 2) -> Callable:
    def setup(d, trained, **_):
        copy_trained(rel)(d, trained=trained)
        with open(os.path.join(d, rel, "checkpoints", str(step), "meta", "metadata"), "w") as f:
            f.write('{"step": 2, "data": {')
    return setup


def both(*setups) -> Callable:
    def setup(d, **kw):
        for s in setups:
            s(d, **kw)
    return setup


def hf_config(extra: dict | None = None) -> str:
    return json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_head": 2,
                       "n_embd": 16, "vocab_size": 64, "n_positions": 32, **(extra or {})})


def task_checkpoint(labels: int, rows: int) -> Callable:
    """A GPT2ForSequenceClassification directory whose config names `labels` labels but whose score has `rows`."""
    def setup(d, **_):
        import numpy as np
        from safetensors.numpy import save_file

        from jaxctx.config import ModelConfig
        from jaxctx.convert import hf_gpt2

        config = json.loads(hf_config({"architectures": ["GPT2ForSequenceClassification"],
                                       "id2label": {str(i): f"L{i}" for i in range(labels)}}))
        m = ModelConfig(family="gpt2", num_layers=1, num_heads=2, d_model=16, vocab_size=64, max_positions=32,
                        task="sequence_classification", num_labels=rows)
        os.makedirs(os.path.join(d, "hf"))
        save_file({r.hf: np.zeros(r.shape, np.float32) for r in hf_gpt2.rules(m)},
                  os.path.join(d, "hf", "model.safetensors"))
        write("hf/config.json", json.dumps(config))(d)
    return setup


def task_model_checkpoint(rel: str = "clf") -> Callable:
    """A params-only checkpoint of the tiny config as a 2-label sequence classifier (zeros: shapes are enough)."""
    def setup(d, **_):
        import jax.numpy as jnp
        import numpy as np
        from flax.core import meta

        from jaxctx.checkpoint import save_params
        from jaxctx.models import build

        cfg = config_lib.load(TINY, ["model.task=sequence_classification", "model.num_labels=2"])
        shapes = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
        params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), meta.unbox(shapes))
        save_params(os.path.join(d, rel), params, {"config": cfg.to_dict(), "step": 0})
    return setup


@dataclasses.dataclass
class Case:
    id: str
    argv: list  # "{d}" is the case directory, "{tiny}" the tiny config; argv[0] is "train.py" or "jaxctx"
    expect: str  # the error line must contain this (after the same substitution)
    setup: Callable | None = None


def T(*args):  # a train.py command line on the tiny config, cheap data settings
    return ["train.py", "--config", "{tiny}", "--workdir", "{d}/run", "--set", "data.num_proc=1",
            "--set", "data.cache_dir={cache}", "--set", "data.max_documents=20", *args]


def G(*args):  # jaxctx generate on the trained tiny workdir
    return ["jaxctx", "generate", "--checkpoint", "{d}/run", *args]


CLS = ["--set", "model.task=sequence_classification", "--set", "model.num_labels=2", "--set",
       "data.task=classification"]
TAG = ["--set", "model.task=token_classification", "--set", "model.num_labels=2", "--set", "data.task=tagging",
       "--set", "model.id2label=[O,B-x]"]


def S(*pairs):
    out = []
    for p in pairs:
        out += ["--set", p]
    return out


CASES = [
    # --- train.py: the config file itself
    Case("config-missing", ["train.py", "--config", "{d}/nope.yaml", "--workdir", "{d}/run"], "{d}/nope.yaml"),
    Case("config-not-utf8", ["train.py", "--config", "{d}/c.yaml", "--workdir", "{d}/run"], "{d}/c.yaml",
         write("c.yaml", b"model:\n  family: \xff\xfegpt2\n")),
    Case("config-bad-yaml", ["train.py", "--config", "{d}/c.yaml", "--workdir", "{d}/run"], "{d}/c.yaml",
         write("c.yaml", "model: [unclosed\n")),
    Case("config-is-dir", ["train.py", "--config", "{d}/cfgdir", "--workdir", "{d}/run"], "{d}/cfgdir",
         mkdir("cfgdir")),
    Case("config-not-mapping", ["train.py", "--config", "{d}/c.yaml", "--workdir", "{d}/run"], "mapping",
         write("c.yaml", "- 1\n- 2\n")),
    Case("config-unknown-section", ["train.py", "--config", "{d}/c.yaml", "--workdir", "{d}/run"], "modle",
         write("c.yaml", "modle:\n  d_model: 8\n")),
    # --- train.py: overrides and validation
    Case("set-unknown-key", T(*S("model.d_modl=3")), "model.d_modl"),
    Case("set-no-equals", T(*S("train.steps")), "train.steps"),
    Case("set-bad-key-shape", T(*S("steps=3")), "steps"),
    Case("set-negative-steps", T(*S("train.steps=-1")), "train.steps"),
    Case("set-wrong-type", T(*S("train.batch_size=eight")), "train.batch_size"),
    Case("set-heads-not-dividing", T(*S("model.num_heads=3")), "model.num_heads"),
    Case("set-seq-len-1", T(*S("data.seq_len=1")), "data.seq_len"),
    Case("set-block-too-long", T(*S("model.attention_block_q=4096")), "model.attention_block_q"),
    Case("set-bad-format", T(*S("data.format=xml")), "data.format"),
    Case("set-passkey-fraction-one", T(*S("data.passkey_fraction=1")), "data.passkey_fraction=1.0"),
    Case("set-passkey-fraction-bert", T(*S("data.passkey_fraction=0.5", "model.family=bert")),
         "data.passkey_fraction=0.5"),
    Case("set-passkey-fraction-streaming", T(*S("data.passkey_fraction=0.5", "data.streaming=true")),
         "data.streaming=false"),
    Case("set-passkey-seq-len-too-short", T(*S("data.passkey_fraction=0.5")), "data.seq_len=128"),
    Case("set-passkey-max-digits-four", T(*S("data.passkey_max_digits=4")), "data.passkey_max_digits=4"),
    Case("set-passkey-min-length-too-long", T(*S("data.passkey_min_length=128")),
         "data.passkey_min_length=128 must be below data.seq_len=128"),
    Case("set-passkey-full-length-fraction-above-one", T(*S("data.passkey_full_length_fraction=1.5")),
         "data.passkey_full_length_fraction=1.5 must be in [0, 1]"),
    Case("set-bad-family", T(*S("model.family=gpt5")), "model.family"),
    Case("set-dropout-one", T(*S("model.dropout=1")), "model.dropout=1.0 must be in [0, 1)"),
    Case("set-attention-dropout-cudnn", T(*S("model.attention_dropout=0.1", "model.attention=cudnn")),
         "model.attention=cudnn cannot apply model.attention_dropout=0.1"),
    Case("set-llama-hidden-dropout", T(*S("model.family=llama", "model.dropout=0.1")), "model.dropout=0.1"),
    Case("set-bad-rope-type", T(*S("model.family=llama", "model.rope_scaling={rope_type: ntk, factor: 2}")),
         "model.rope_scaling.rope_type='ntk'"),
    Case("set-yarn-rope-no-factor", T(*S("model.family=llama", "model.rope_scaling={rope_type: yarn}")),
         "model.rope_scaling.factor is missing"),
    Case("set-yarn-rope-unknown-field", T(*S("model.family=llama",
                                             "model.rope_scaling={rope_type: yarn, factor: 4, betafast: 8}")),
         "model.rope_scaling.betafast"),
    Case("set-llama3-rope-no-factor", T(*S("model.family=llama", "model.rope_scaling={rope_type: llama3}")),
         "rope_scaling"),
    Case("set-pmap-fsdp", T(*S("parallel.mode=pmap", "parallel.fsdp=2")), "parallel.fsdp"),
    Case("set-mesh-too-big", T(*S("parallel.fsdp=3")), "parallel"),
    Case("set-sequence-mesh-too-big", T(*S("parallel.sequence=3", "data.seq_len=96")), "parallel.sequence=3"),
    Case("set-seq-len-not-zigzag", T(*S("parallel.sequence=4", "data.seq_len=100")), "data.seq_len=100"),
    Case("set-sequence-with-blockwise", T(*S("parallel.sequence=2", "model.attention=blockwise")),
         "model.attention=blockwise"),
    Case("set-sequence-with-pmap", T(*S("parallel.sequence=2", "parallel.mode=pmap")), "parallel.sequence"),
    Case("set-sequence-chunk-too-long", T(*S("parallel.sequence=4", "model.mlp_chunk=64")), "model.mlp_chunk=64"),
    Case("set-bad-context-parallel", T(*S("parallel.sequence=2", "model.context_parallel=ulysses")),
         "model.context_parallel"),
    Case("set-batch-not-divisible", T(*S("train.batch_size=6", "train.grad_accum=4")), "train.grad_accum"),
    # --- train.py: task heads
    Case("set-task-without-num-labels", T(*S("model.task=sequence_classification")), "model.num_labels=0"),
    Case("set-regression-three-labels", T(*S("model.task=sequence_classification", "model.num_labels=3",
                                             "model.problem_type=regression")), "model.num_labels=3"),
    Case("set-num-labels-on-lm", T(*S("model.num_labels=3")), "model.num_labels=3"),
    Case("set-bad-task", T(*S("model.task=summarization")), "model.task='summarization'"),
    Case("set-id2label-wrong-length", T(*S("model.task=token_classification", "model.num_labels=3",
                                           "model.id2label=[O, B-X]")), "model.id2label"),
    Case("set-nsp-head-on-gpt2", T(*S("model.nsp_head=true")), "model.nsp_head"),
    Case("set-data-nsp-on-gpt2", T(*S("data.nsp=true")), "data.nsp"),
    Case("set-data-nsp-without-head", T(*S("data.nsp=true", "model.family=bert")), "model.nsp_head"),
    Case("task-without-labelled-data", T(*S("model.task=token_classification", "model.num_labels=5")),
         "model.task=token_classification"),
    # --- train.py: the platform
    Case("cudnn-on-cpu", T(*S("model.attention=cudnn")), "model.attention=cudnn"),
    Case("splash-on-cpu", T(*S("model.attention=splash")), "model.attention=splash"),
    # --- train.py: data and tokenizer
    Case("data-missing-file", T(*S("data.source={d}/corpus.txt")), "{d}/corpus.txt"),
    Case("data-glob-matches-nothing", T(*S("data.source={d}/*.jsonl")), "{d}/*.jsonl"),
    Case("data-empty-dir", T(*S("data.source={d}/corpus")), "{d}/corpus", mkdir("corpus")),
    Case("data-whitespace-only", T(*S("data.source={d}/c.txt")), "c.txt", write("c.txt", "  \n\n \t\n")),
    Case("data-broken-jsonl", T(*S("data.source={d}/c.jsonl")), "c.jsonl",
         write("c.jsonl", '{"text": "fine"}\n{"text": "broken\n')),
    Case("data-missing-column", T(*S("data.source={d}/c.jsonl")), "text",
         write("c.jsonl", "".join(json.dumps({"body": f"doc {i} " * 50}) + "\n" for i in range(30)))),
    Case("data-hub-offline", T(*S("data.source=hub:nobody/no-such-dataset")), "nobody/no-such-dataset"),
    Case("tokenizer-missing-dir", T(*S("data.tokenizer={d}/tok")), "{d}/tok"),
    Case("tokenizer-empty-dir", T(*S("data.tokenizer={d}/tok")), "{d}/tok", mkdir("tok")),
    Case("tokenizer-invalid-json", T(*S("data.tokenizer={d}/tok")), "{d}/tok",
         write("tok/tokenizer.json", '{"version": "1.0"}')),
    Case("vocab-smaller-than-tokenizer", T(*S("model.vocab_size=100")), "model.vocab_size"),
    # --- train.py: workdir, resume and init_from
    Case("workdir-is-file", ["train.py", "--config", "{tiny}", "--workdir", "{d}/wd"], "{d}/wd",
         write("wd", "not a directory\n")),
    Case("resume-other-width", T(*S("model.d_model=128")), "model.d_model: 64", copy_trained()),
    Case("resume-other-family", T(*S("model.family=llama")), "model.family", copy_trained()),
    Case("resume-other-seq-len", T(*S("data.seq_len=64")), "data.seq_len", copy_trained()),
    Case("resume-other-optimizer", T(*S("train.optimizer=lion")), "train.optimizer", copy_trained()),
    Case("resume-other-corpus", T(*S("data.source={d}/c.txt")), "data.source",
         both(copy_trained(), write("c.txt", "hello world\n" * 200))),
    Case("workdir-config-garbled", T(), "config.yaml",
         both(copy_trained(), write("run/config.yaml", "model: {{{\n"))),
    Case("workdir-only-metrics", T(), "metrics.jsonl", write("run/metrics.jsonl", '{"step": 1}\n')),
    Case("every-checkpoint-corrupt", T(), "step 2", garble_checkpoint()),
    Case("init-from-missing", ["train.py", "--config", "{tiny}", "--workdir", "{d}/new", "--set",
                               "train.init_from={d}/nothing"], "{d}/nothing"),
    Case("init-from-no-checkpoint", ["train.py", "--config", "{tiny}", "--workdir", "{d}/new", "--set",
                                     "train.init_from={d}/empty"], "{d}/empty", mkdir("empty/checkpoints")),
    Case("init-from-other-shapes", ["train.py", "--config", "{tiny}", "--workdir", "{d}/new",
                                    *S("train.init_from={d}/run", "model.d_model=128", "data.num_proc=1",
                                       "data.cache_dir={cache}", "data.max_documents=20")],
         "train.init_from={d}/run", copy_trained()),
    Case("init-from-shorter-positions", ["train.py", "--config", "{tiny}", "--workdir", "{d}/new",
                                         *S("train.init_from={d}/run", "data.seq_len=256", "data.num_proc=1",
                                            "data.cache_dir={cache}", "data.max_documents=20")],
         "train.extend_positions", copy_trained()),
    Case("extend-positions-unknown", T(*S("train.init_from={d}/run", "train.extend_positions=stretch")),
         "train.extend_positions='stretch'"),
    Case("init-from-corrupt", ["train.py", "--config", "{tiny}", "--workdir", "{d}/new",
                               *S("train.init_from={d}/run", "data.num_proc=1", "data.cache_dir={cache}",
                                  "data.max_documents=20")],
         "step 2", garble_checkpoint()),
    # --- jaxctx convert
    Case("from-hf-missing-dir", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "{d}/hf"),
    Case("from-hf-no-config", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "config.json",
         write("hf/model.safetensors", b"\0" * 16)),
    Case("from-hf-bad-json", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "config.json",
         write("hf/config.json", "{not json")),
    Case("from-hf-unsupported", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "t5",
         write("hf/config.json", json.dumps({"model_type": "t5"}))),
    Case("from-hf-pickle-only", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "pytorch_model.bin",
         both(write("hf/config.json", hf_config()), write("hf/pytorch_model.bin", b"PK\x03\x04"))),
    Case("from-hf-truncated-weights", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"], "model.safetensors",
         both(write("hf/config.json", hf_config()), write("hf/model.safetensors", b"\x10\0\0\0\0\0\0\0{\"a"))),
    Case("from-hf-task-num-labels-mismatch", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"],
         "num_labels=5 but id2label names 2 labels",
         write("hf/config.json", hf_config({"architectures": ["GPT2ForSequenceClassification"], "num_labels": 5,
                                            "id2label": {"0": "neg", "1": "pos"}}))),
    Case("from-hf-task-head-shape", ["jaxctx", "convert", "from-hf", "{d}/hf", "{d}/out"],
         "score.weight is [2, 16], expected [3, 16]", task_checkpoint(labels=3, rows=2)),
    Case("to-hf-missing", ["jaxctx", "convert", "to-hf", "{d}/ckpt", "{d}/out"], "{d}/ckpt"),
    Case("to-hf-out-not-empty", ["jaxctx", "convert", "to-hf", "{d}/run", "{d}/out"], "{d}/out",
         both(copy_trained(), write("out/mine.txt", "keep me\n"))),
    Case("to-hf-corrupt", ["jaxctx", "convert", "to-hf", "{d}/run", "{d}/out"], "step 2", garble_checkpoint()),
    Case("to-hf-no-such-step", ["jaxctx", "convert", "to-hf", "{d}/run", "{d}/out", "--step", "999"], "999",
         copy_trained()),
    Case("to-hf-bad-shard-size", ["jaxctx", "convert", "to-hf", "{d}/run", "{d}/out", "--shard-size", "huge"],
         "huge", copy_trained()),
    # --- jaxctx bench / plan / data / tokenizer
    Case("bench-attention-bad-len", ["jaxctx", "bench", "attention", "--seq-lens", "128,abc"], "abc"),
    Case("bench-attention-cudnn-cpu", ["jaxctx", "bench", "attention", "--seq-lens", "128", "--impls", "cudnn",
                                       "--dtype", "bfloat16"], "cudnn"),
    Case("bench-attention-bad-out", ["jaxctx", "bench", "attention", "--seq-lens", "128", "--out", "{d}/r.txt"],
         "r.txt"),
    Case("bench-max-context-zero-budget", ["jaxctx", "bench", "max-context", "--config", "{tiny}",
                                           "--budget-gb", "0"], "--budget-gb"),
    Case("bench-train-missing-config", ["jaxctx", "bench", "train", "--config", "{d}/x.yaml", "--seq-lens",
                                        "64"], "{d}/x.yaml"),
    Case("bench-finetune-context-no-data", ["jaxctx", "bench", "finetune-context", "--data", "{d}/nodata",
                                            "--workdir-root", "{d}/runs"], "{d}/nodata"),
    Case("bench-finetune-context-bad-out", ["jaxctx", "bench", "finetune-context", "--data", "{d}/nodata",
                                            "--workdir-root", "{d}/runs", "--out", "{d}/r.txt"], "r.txt"),
    Case("plan-missing-config", ["jaxctx", "plan", "--config", "{d}/x.yaml"], "{d}/x.yaml"),
    Case("plan-unknown-key", ["jaxctx", "plan", "--config", "{tiny}", "--set", "model.layers=3"], "model.layers"),
    Case("plan-cudnn-on-cpu", ["jaxctx", "plan", "--config", "{tiny}", "--set", "model.attention=cudnn"],
         "model.attention=cudnn"),
    Case("bench-train-splash-on-cpu", ["jaxctx", "bench", "train", "--config", "{tiny}", "--seq-lens", "128",
                                       "--set", "model.attention=splash"], "model.attention=splash"),
    Case("data-inspect-missing-source", ["jaxctx", "data", "inspect", "--config", "{tiny}", "--set",
                                         "data.source={d}/none.txt"], "{d}/none.txt"),
    Case("tokenizer-train-missing-data", ["jaxctx", "tokenizer", "train", "--data", "{d}/none.txt",
                                          "--vocab-size", "300", "--out", "{d}/tok"], "{d}/none.txt"),
    Case("tokenizer-train-tiny-vocab", ["jaxctx", "tokenizer", "train", "--data", "{d}/c.txt", "--vocab-size",
                                        "10", "--out", "{d}/tok"], "--vocab-size",
         write("c.txt", "some text\n" * 50)),
    Case("tokenizer-train-out-not-empty", ["jaxctx", "tokenizer", "train", "--data", "{d}/c.txt",
                                           "--vocab-size", "300", "--out", "{d}/tok"], "{d}/tok",
         both(write("c.txt", "some text\n" * 50), write("tok/mine.txt", "keep\n"))),
    # --- jaxctx generate
    Case("generate-task-model", ["jaxctx", "generate", "--checkpoint", "{d}/clf", "--prompt", "x"],
         "model.task=sequence_classification", task_model_checkpoint()),
    Case("generate-top-p-out-of-range", G("--prompt", "x", "--top-p", "1.5"), "top_p=1.5", copy_trained()),
    Case("generate-num-beams-zero", G("--prompt", "x", "--num-beams", "0"), "num_beams=0", copy_trained()),
    Case("generate-prompt-too-long", G("--prompt", "a" * 200), "model.max_positions=128", copy_trained()),
    Case("generate-out-exists", G("--prompt", "x", "--out", "{d}/o.jsonl"), "{d}/o.jsonl",
         both(copy_trained(), write("o.jsonl", "mine\n"))),
    Case("generate-prompts-bad-row", G("--prompts", "{d}/p.jsonl"), "{d}/p.jsonl:2",
         both(copy_trained(), write("p.jsonl", '{"prompt": "ok"}\n{"prompt": 3}\n'))),
    Case("generate-bert-model", ["jaxctx", "generate", "--hf", "{d}/hf", "--prompt", "x"], "bert",
         write("hf/config.json", json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))),
    Case("generate-mesh-bad-axis", G("--prompt", "x", "--mesh", "data=2,heads=2"), "'heads=2'"),
    Case("generate-mesh-too-many-devices", G("--prompt", "x", "--mesh", "data=64"), "data x fsdp x sequence x tensor",
         copy_trained()),
    Case("generate-mesh-sequence", G("--prompt", "x", "--mesh", "data=-1,sequence=2"), "sequence=2",
         copy_trained()),
    Case("generate-missing-checkpoint", ["jaxctx", "generate", "--checkpoint", "{d}/nope", "--prompt", "x"],
         "{d}/nope"),
    # --- labelled data (data.task), jaxctx data make-task, jaxctx predict
    Case("task-unknown-label-column", T(*CLS, "--set", "data.source={d}/t.jsonl"), "'label'",
         write("t.jsonl", '{"text": "a", "category": "x"}\n' * 4)),
    Case("task-num-labels-mismatch", T(*CLS, "--set", "data.source={d}/t"), "model.num_labels=2",
         both(write("t/train.jsonl", "".join(f'{{"text": "t{i}", "label": "c{i % 3}"}}\n' for i in range(6))),
              write("t/validation.jsonl", '{"text": "v", "label": "c0"}\n'))),
    Case("task-tag-outside-label-set", T(*TAG, "--set", "data.source={d}/t"), "example 1 of {d}/t (train), "
         "column 'tags'", both(write("t/train.jsonl", '{"tokens": ["a"], "tags": ["B-x"]}\n'
                                                      '{"tokens": ["b"], "tags": ["B-FOO"]}\n'),
                               write("t/validation.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n'))),
    Case("task-token-tag-length-mismatch", T(*TAG, "--set", "data.source={d}/t"), "example 1 of {d}/t (train): "
         "column 'tokens' has 3 words but column 'tags' has 2", both(
             write("t/train.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b", "c"], '
                                    '"tags": ["O", "B-x"]}\n'),
             write("t/validation.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n'))),
    Case("task-keep-best-unknown-metric", T(*CLS, "--set", "train.keep_best=f1"), "train.keep_best='f1'"),
    Case("task-data-without-task-model", T("--set", "data.task=classification"), "model.task=lm"),
    Case("make-task-out-not-empty", ["jaxctx", "data", "make-task", "stdlib-package", "--out", "{d}/out"],
         "{d}/out", write("out/mine.txt", "keep\n")),
    Case("predict-out-exists", ["jaxctx", "predict", "--checkpoint", "{d}/clf", "--data", "{d}/x.jsonl", "--out",
                                "{d}/o.jsonl"], "{d}/o.jsonl",
         both(task_model_checkpoint(), write("x.jsonl", '{"text": "a"}\n'), write("o.jsonl", "mine\n"))),
    Case("predict-missing-text-column", ["jaxctx", "predict", "--checkpoint", "{d}/clf", "--data", "{d}/x.jsonl",
                                         "--out", "{d}/o.jsonl"], "'text'",
         both(task_model_checkpoint(), write("x.jsonl", '{"body": "a"}\n'))),
    Case("predict-language-model", ["jaxctx", "predict", "--checkpoint", "{d}/run", "--data", "{d}/x.jsonl",
                                    "--out", "{d}/o.jsonl"], "model.task=lm",
         both(copy_trained(), write("x.jsonl", '{"text": "a"}\n'))),
]


def snapshot(root: str) -> dict:
    """Every file under root -> sha256 of its bytes (directories as entries too, so new ones are seen)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_case(argv: list, capsys) -> tuple[int, str]:
    if argv[0] == "train.py":
        code = train_cli.main(argv[1:])
    else:
        code = cli.main(argv[1:])
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, prog: str, expect: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert expect in lines[0], (expect, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, trained, cache_dir):
    d = str(tmp_path)
    if case.setup is not None:
        case.setup(d, trained=trained)
    subst = lambda s: s.replace("{d}", d).replace("{tiny}", TINY).replace("{cache}", cache_dir)  # noqa: E731
    argv = [subst(a) for a in case.argv]
    before = snapshot(d)
    capsys.readouterr()
    code, err = run_case(argv, capsys)
    assert code == 2, err
    prog = "train.py" if argv[0] == "train.py" else f"jaxctx {argv[1]}"
    assert_one_error_line(err, prog, subst(case.expect))
    assert snapshot(d) == before, "a failed command changed or created files"


def test_corpus_is_large_and_covers_every_command():
    commands = {c.argv[0] if c.argv[0] == "train.py" else c.argv[1] for c in CASES}
    assert commands == {"train.py", "convert", "bench", "plan", "data", "tokenizer", "generate", "predict"}
    assert len(CASES) >= 40


@pytest.mark.slow
def test_real_processes_print_one_line(tmp_path):
    """The console entry points (not only their main functions): one line on stderr, exit 2, no traceback."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"model:\n  family: \xff\n")
    runs = [([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(bad), "--workdir",
              str(tmp_path / "run")], "train.py", str(bad)),
            ([sys.executable, "-m", "jaxctx.cli", "convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "o")],
             "jaxctx convert", str(tmp_path / "hf"))]
    for cmd, prog, expect in runs:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, prog, expect)
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]
