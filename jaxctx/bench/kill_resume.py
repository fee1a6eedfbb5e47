"""Kill -9 soak: train, SIGKILL the job at random moments, restart it each time, compare with an uninterrupted run.

    python -m jaxctx.bench.kill_resume [--kills 20] [--seed 0] [--config configs/tiny.yaml] [--set k=v ...]
        [--workdir DIR] [--out FILE.json]

Each round starts `python train.py` on the same workdir and kills it (SIGKILL: no handler runs) at a random
moment of one of four phases, chosen in turn:

- `startup`:   0-3 s after the process starts (imports, data preparation, mesh, restore);
- `compile`:   as soon as the run prints its `workdir:` line (the first step is being compiled);
- `training`:  a random 0-1 s after the first new `metrics.jsonl` row (steps, metrics writes);
- `saving`:    the moment a new checkpoint directory appears (Orbax's async save is being finalised).

After the kills, one more start runs to the end. The result is a pass only if every restart started cleanly
(a killed run never leaves a workdir that the next start refuses) and the final `metrics.jsonl` equals the
uninterrupted run's at every step (step, loss, lr, grad_norm bit for bit) with no duplicate rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
DEFAULT_SETTINGS = ("train.steps=100", "train.checkpoint_every=4", "train.log_every=1",
                    "data.validation_fraction=0", "data.max_documents=20", "data.num_proc=1")
PHASES = ("startup", "compile", "training", "saving")
COMPARED = ("step", "loss", "lr", "grad_norm")  # tokens_per_sec and step_time_s are timings: they differ


def _command(config: str, workdir: str, settings) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", workdir]
    for s in settings:
        cmd += ["--set", s]
    return cmd


def _env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


class _Run:
    """One train.py process whose stderr is read on a thread (so the pipe never fills) and watched for a line."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.started = threading.Event()  # the `workdir:` line: pre-flight and restore are done
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("workdir:"):
                self.started.set()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def refused(self) -> bool:
        """True if this start failed on its own (a one-line error or a traceback) rather than being killed."""
        text = "".join(self.lines)
        return "Traceback" in text or ": error: " in text


def _checkpoints(workdir: str) -> set[str]:
    root = os.path.join(workdir, "checkpoints")
    return {n for n in os.listdir(root) if n.isdigit()} if os.path.isdir(root) else set()


def _metrics_rows(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _kill_in_phase(run: _Run, phase: str, rng: random.Random, workdir: str, timeout: float) -> str:
    """Wait for the phase's moment, then SIGKILL; returns what actually happened ('killed <phase>' or 'exited')."""
    deadline = time.time() + timeout
    if phase == "startup":
        time.sleep(rng.uniform(0.0, 3.0))
    elif phase == "compile":
        while not run.started.wait(0.02):
            if run.proc.poll() is not None or time.time() > deadline:
                break
    elif phase == "training":  # once a new metrics row shows steps are running, a random moment later
        rows = _metrics_rows(workdir)
        while run.proc.poll() is None and time.time() < deadline and _metrics_rows(workdir) <= rows:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
    else:  # saving: the moment a new step directory is renamed into place
        before = _checkpoints(workdir)
        while run.proc.poll() is None and time.time() < deadline and _checkpoints(workdir) <= before:
            time.sleep(0.005)
    exited = run.proc.poll() is not None
    run.kill()
    return "exited" if exited else f"killed during {phase}"


def soak(workdir: str, *, kills: int, seed: int = 0, config: str = DEFAULT_CONFIG, settings=DEFAULT_SETTINGS,
         timeout: float = 600.0, log=print) -> dict:
    """Run the soak in `workdir` (made fresh) against a reference run beside it; returns the report dict."""
    rng = random.Random(seed)
    reference, work = os.path.join(workdir, "uninterrupted"), os.path.join(workdir, "killed")
    for path in (reference, work):
        shutil.rmtree(path, ignore_errors=True)
    start = time.time()
    ref = _Run(_command(config, reference, settings))
    if ref.finish(timeout) != 0:
        raise RuntimeError("the uninterrupted run failed:\n" + "".join(ref.lines[-20:]))
    want = read_metrics(reference)
    rounds = []
    for i in range(kills):
        phase = PHASES[i % len(PHASES)]
        run = _Run(_command(config, work, settings))
        outcome = _kill_in_phase(run, phase, rng, work, timeout)
        resumed = next((line.strip() for line in run.lines if line.startswith("resumed from")), None)
        rounds.append({"round": i + 1, "phase": phase, "outcome": outcome, "refused": run.refused(),
                       "resumed": resumed, "checkpoints": sorted(map(int, _checkpoints(work)))})
        log(f"round {i + 1:2d}: {outcome:24s} checkpoints {rounds[-1]['checkpoints']}"
            + ("  REFUSED: " + "".join(run.lines[-3:]).strip() if run.refused() else ""))
    final = _Run(_command(config, work, settings))
    final_code = final.finish(timeout)
    got = read_metrics(work) if os.path.exists(os.path.join(work, "metrics.jsonl")) else []
    steps = [r["step"] for r in got]
    equal = [{k: r[k] for k in COMPARED} for r in got] == [{k: r[k] for k in COMPARED} for r in want]
    report = {
        "kills": kills, "seed": seed, "config": os.path.relpath(config, ROOT), "settings": list(settings),
        "rounds": rounds, "final_exit_code": final_code,
        "final_error": None if final_code == 0 else "".join(final.lines[-5:]),
        "restarts_refused": sum(r["refused"] for r in rounds),
        "metrics_rows": len(got), "reference_rows": len(want), "duplicate_steps": len(steps) - len(set(steps)),
        "metrics_equal": equal, "wall_s": round(time.time() - start, 1),
    }
    report["passed"] = bool(final_code == 0 and equal and report["restarts_refused"] == 0
                            and report["duplicate_steps"] == 0)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxctx.bench.kill_resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the final run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default configs/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides (after the soak's own: 100 steps, checkpoint every 4)")
    parser.add_argument("--workdir", default=None, help="where both runs live (default: a temp directory)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxctx-kill-resume-")
    report = soak(workdir, kills=args.kills, seed=args.seed, config=args.config,
                  settings=(*DEFAULT_SETTINGS, *args.overrides))
    print(f"{report['kills']} kills, {report['restarts_refused']} refused restarts, final exit "
          f"{report['final_exit_code']}, {report['metrics_rows']}/{report['reference_rows']} rows, "
          f"{report['duplicate_steps']} duplicates, metrics equal: {report['metrics_equal']} "
          f"-> {'PASS' if report['passed'] else 'FAIL'} ({report['wall_s']} s)")
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
