#!/usr/bin/env python3
"""A stand-in for `gcloud`, first on PATH in tests/tpu: it records every call and plays a scripted TPU slice.

State lives in $FAKE_GCLOUD_DIR:
  scenario.json  what the slice does (below), written by the test
  calls.jsonl    one JSON argv list per call, in order
  state.json     the fake's memory between calls: creates so far, describes since the last create, exists
  preempted      present once a fake job "preempts" the slice: describe then answers SUSPENDED
  workers/N/     worker N's home directory (the VM's disk: delete wipes what setup and launch put there)
  gcs/BUCKET/... the objects of gs://BUCKET/... for `gcloud storage ls` / `cat`

scenario.json keys:
  workers     number of workers of the slice (default 1)
  lifecycles  per create request, the states `queued-resources describe` answers in turn (the last repeats);
              the last lifecycle serves every later create
  exec        substrings: an ssh --command containing one is run by `bash -c` on each addressed worker (HOME and
              the working directory are the worker's home); any other command is only recorded (it would install
              packages or use sudo)
  ssh_fail    {substring: n}: the first n ssh calls whose command contains substring fail with status 255
Ssh and scp to a slice that is not ACTIVE fail with status 255, as they would.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.environ["FAKE_GCLOUD_DIR"]


def _load(name, default):
    path = os.path.join(ROOT, name)
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _save(name, value):
    with open(os.path.join(ROOT, name), "w") as f:
        json.dump(value, f)


def _flag(argv, name, default=None):
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def _worker_homes(scenario, which):
    count = scenario.get("workers", 1)
    indices = range(count) if which == "all" else [int(which)]
    homes = []
    for i in indices:
        home = os.path.join(ROOT, "workers", str(i))
        os.makedirs(home, exist_ok=True)
        homes.append(home)
    return homes


def _state_now(scenario, state, consume):
    if not state.get("exists"):
        return None
    if os.path.exists(os.path.join(ROOT, "preempted")):
        return "SUSPENDED"
    lifecycles = scenario.get("lifecycles", [["ACTIVE"]])
    cycle = lifecycles[min(state["creates"], len(lifecycles)) - 1]
    answer = cycle[min(state["describes"], len(cycle) - 1)]
    if consume:
        state["describes"] += 1
    return answer


def _gcs_path(url):
    assert url.startswith("gs://"), url
    return os.path.join(ROOT, "gcs", url[len("gs://"):])


def _delete_slice(scenario, state):
    """The VMs go: their processes die and their disks (what setup and launch wrote) vanish."""
    for home in _worker_homes(scenario, "all"):
        for pid_file in glob.glob(os.path.join(home, "jaxctx-logs", "*.pid")):
            try:
                os.kill(int(open(pid_file).read().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        for name in ("jaxctx-logs", "jaxctx"):
            shutil.rmtree(os.path.join(home, name), ignore_errors=True)
    state.update(exists=False, describes=0)
    if os.path.exists(os.path.join(ROOT, "preempted")):
        os.remove(os.path.join(ROOT, "preempted"))


def main(argv):
    with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    scenario = _load("scenario.json", {})
    state = _load("state.json", {"creates": 0, "describes": 0, "exists": False})
    words = [a for a in argv if not a.startswith("--")]
    try:
        if words[:3] == ["compute", "tpus", "queued-resources"]:
            verb = words[3]
            if verb == "create":
                state.update(creates=state["creates"] + 1, describes=0, exists=True)
                return 0
            if verb == "describe":
                answer = _state_now(scenario, state, consume=True)
                if answer is None:
                    print(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {words[4]}",
                          file=sys.stderr)
                    return 1
                print(answer)
                return 0
            if verb == "delete":
                _delete_slice(scenario, state)
                return 0
        if words[:3] == ["compute", "tpus", "tpu-vm"]:
            if _state_now(scenario, state, consume=False) != "ACTIVE":
                print("ssh: connect to host 10.0.0.2 port 22: Connection timed out", file=sys.stderr)
                return 255
            homes = _worker_homes(scenario, _flag(argv, "worker", "0"))
            if words[3] == "scp":
                source, dest = words[4], words[5].split(":", 1)[1]
                for home in homes:
                    shutil.copy(source, os.path.join(home, dest))
                return 0
            if words[3] == "ssh":
                command = _flag(argv, "command")
                failures = scenario.get("ssh_fail", {})
                for match, times in failures.items():
                    if match in command and times > 0:
                        failures[match] = times - 1
                        _save("scenario.json", scenario)
                        print("ssh: connect to host 10.0.0.3 port 22: Connection refused", file=sys.stderr)
                        return 255
                if not any(s in command for s in scenario.get("exec", [])):
                    return 0
                status = 0
                for home in homes:
                    done = subprocess.run(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": home},
                                          capture_output=True, text=True)
                    sys.stdout.write(done.stdout)
                    sys.stderr.write(done.stderr)
                    status = max(status, done.returncode)
                return status
        if words[:2] == ["storage", "ls"]:
            found = sorted(glob.glob(_gcs_path(words[2])))
            if not found:
                print(f"ERROR: (gcloud.storage.ls) One or more URLs matched no objects.", file=sys.stderr)
                return 1
            for path in found:
                print("gs://" + os.path.relpath(path, os.path.join(ROOT, "gcs")))
            return 0
        if words[:2] == ["storage", "cat"]:
            with open(_gcs_path(words[2])) as f:
                sys.stdout.write(f.read())
            return 0
        print(f"fake gcloud: unsupported call {argv}", file=sys.stderr)
        return 2
    finally:
        _save("state.json", state)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
