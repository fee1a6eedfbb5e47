"""slurm/train.sbatch: shellcheck clean, one-line errors, and the srun command it issues (a fake `srun` first on
PATH records its argv). That train.py under srun's variables forms one jax.distributed job is tested in
test_train_multiprocess.py (test_slurm_sbatch_trains_like_one_process)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "train.sbatch")


def _run(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "srun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_ARGV"\n')
    fake.chmod(0o755)
    environ = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_ARGV=str(tmp_path / "argv"),
                   JAXCTX_ROOT=ROOT, SLURM_JOB_ID="42", VENV=str(tmp_path / "none"), **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=environ)


def test_srun_gets_train_py_with_the_arguments_as_typed(tmp_path):
    done = _run(tmp_path, "configs/tiny.yaml", "--set", "train.init_from=/runs/a b", "--set", "data.source=x*'")
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["--kill-on-bad-exit=1", "python", "train.py", "--config", "configs/tiny.yaml", "--workdir",
                    "workdirs/tiny", "--set", "train.init_from=/runs/a b", "--set", "data.source=x*'"]
    assert "job 42" in done.stdout
    done = _run(tmp_path, "configs/tiny.yaml", WORKDIR="gs://bucket/run")
    assert (tmp_path / "argv").read_text().splitlines()[6] == "gs://bucket/run"


def test_user_mistakes_are_one_line(tmp_path):
    for args, message in (((), "usage: sbatch"), (("configs/nope.yaml",), "config configs/nope.yaml does not exist")):
        done = _run(tmp_path, *args)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "argv").exists()


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    done = subprocess.run([shellcheck, SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
