# shellcheck shell=bash disable=SC2034,SC2088
# (SC2034: the variables are used by the scripts that source this file; SC2088: a ~ in the REMOTE_* paths is
# expanded by the worker's shell, not here.)
# Shared defaults and helpers of the tpu/ scripts: sourced by each of them, never run on its own.
#
# Every default is an environment variable; the flags below override it for one call:
#   --name NAME       TPU_NAME     queued resource and node id                       (default: jaxctx)
#   --zone ZONE       TPU_ZONE     Cloud TPU zone                                    (default: us-west4-a)
#   --type TYPE       TPU_TYPE     accelerator type: v4-8, v5litepod-16, v5p-16, v6e-16, ... (default: v5litepod-16)
#   --runtime VER     TPU_RUNTIME  TPU VM runtime version (default: from the generation, see default_runtime)
#   --project ID      TPU_PROJECT  GCP project (default: gcloud's configured project)
# Scripts that start a run also read TPU_BUCKET (gs://bucket/prefix; a run's workdir is TPU_BUCKET/RUN).
# Timing knobs (seconds), overridable so that the offline tests run fast:
#   TPU_POLL_S (30)  between state polls        TPU_BACKOFF_S (60)  first retry delay, doubled per retry

set -euo pipefail

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$TPU_DIR")"

TPU_NAME="${TPU_NAME:-jaxctx}"
TPU_ZONE="${TPU_ZONE:-us-west4-a}"
TPU_TYPE="${TPU_TYPE:-v5litepod-16}"
TPU_RUNTIME="${TPU_RUNTIME:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_POLL_S="${TPU_POLL_S:-30}"
TPU_BACKOFF_S="${TPU_BACKOFF_S:-60}"

# On every worker (the TPU VM's home directory): the project, its virtualenv, and one log per run.
REMOTE_SRC='~/jaxctx'                  # unpacked git archive of HEAD (tpu/setup)
REMOTE_PYTHON='~/jaxctx-venv/bin/python'  # Python >= 3.11 (jax >= 0.7), made by uv in tpu/setup
REMOTE_LOGS='~/jaxctx-logs'            # RUN.log, RUN.pid (train.py's pid), RUN.exit (its exit status), current

COMMON_FLAGS_HELP="common flags (env var, default):
  --name NAME      TPU_NAME     queued resource / node id ($TPU_NAME)
  --zone ZONE      TPU_ZONE     zone ($TPU_ZONE)
  --type TYPE      TPU_TYPE     accelerator type ($TPU_TYPE)
  --runtime VER    TPU_RUNTIME  runtime version (default for the generation: v4 tpu-ubuntu2204-base,
                                v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project ID     TPU_PROJECT  GCP project (gcloud's configured project)
  -h, --help       this help"

# say MESSAGE: what the script is doing, on stderr (stdout stays for results).
say() { printf '[tpu %s] %s\n' "$(basename "$0")" "$*" >&2; }

# die MESSAGE: a user mistake -- one line naming what is wrong and what would be right, exit 2.
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }

# run CMD...: print the command (shell-quoted, so it can be pasted) and run it.
run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  "$@"
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# parse_common "$@": consume the common flags; the rest is left in ARGS. Prints USAGE for --help.
parse_common() {
  ARGS=()
  while (($#)); do
    case "$1" in
      -h|--help) printf '%s\n\n%s\n' "$USAGE" "$COMMON_FLAGS_HELP"; exit 0 ;;
      --name|--zone|--type|--runtime|--project)
        (($# >= 2)) || die "$1 needs a value"
        case "$1" in
          --name) TPU_NAME="$2" ;; --zone) TPU_ZONE="$2" ;; --type) TPU_TYPE="$2" ;;
          --runtime) TPU_RUNTIME="$2" ;; --project) TPU_PROJECT="$2" ;;
        esac
        shift 2 ;;
      --name=*|--zone=*|--type=*|--runtime=*|--project=*)
        local flag="${1%%=*}" value="${1#*=}"
        shift
        set -- "$flag" "$value" "$@"
        ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  if [[ -z "$TPU_RUNTIME" ]]; then
    TPU_RUNTIME="$(default_runtime "$TPU_TYPE")" \
      || die "no default runtime for accelerator type $TPU_TYPE: pass --runtime VER (or set TPU_RUNTIME)"
  fi
  # The scripts call each other (babysit -> create, setup, launch): they see the same values.
  export TPU_NAME TPU_ZONE TPU_TYPE TPU_RUNTIME TPU_PROJECT TPU_POLL_S TPU_BACKOFF_S
  LOCATION=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then LOCATION+=(--project="$TPU_PROJECT"); fi
}

# qr_state: the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...);
# NOT_FOUND when gcloud cannot describe it (it does not exist, or the API did not answer).
qr_state() {
  local state
  if state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" \
              --format='value(state.state)' 2>/dev/null)" && [[ -n "$state" ]]; then
    echo "$state"
  else
    echo NOT_FOUND
  fi
}

# tpu_ssh WORKER COMMAND: run one shell command on worker WORKER (a number or "all") of the node.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# check_run_name NAME: a run name is a file name on the workers and a path part of the workdir.
check_run_name() {
  [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || die "run name '$1' must be letters, digits, '.', '_' or '-' (it names the workdir and the log files)"
}

# resolve_workdir RUN [WORKDIR]: the run's gs:// workdir (TPU VM disks vanish on preemption).
resolve_workdir() {
  local run_name="$1" workdir="${2:-}"
  if [[ -z "$workdir" ]]; then
    [[ -n "${TPU_BUCKET:-}" ]] || die "no workdir: pass --workdir gs://BUCKET/RUN or set TPU_BUCKET=gs://BUCKET/PREFIX"
    workdir="${TPU_BUCKET%/}/$run_name"
  fi
  [[ "$workdir" == gs://?* ]] \
    || die "workdir $workdir is not a gs:// URL: a TPU VM's disk vanishes on preemption, so checkpoints must live in Cloud Storage"
  echo "${workdir%/}"
}

# workdir_progress WORKDIR: prints "STEP TARGET" -- the newest complete checkpoint step (0 if none) and
# train.steps of the newest config record (0 if none). Read from Cloud Storage, never guessed:
#  - a checkpoint step on gs:// is complete once Orbax wrote checkpoints/STEP/commit_success.txt;
#  - the records are config.yaml (first start) and config.resumed-STEP[-N].yaml (a continued run that
#    changed a key such as train.steps); the newest is the one with the highest (STEP, N).
workdir_progress() {
  local workdir="$1" step record target=0
  step="$( { gcloud storage ls "$workdir/checkpoints/*/commit_success.txt" 2>/dev/null || true; } \
           | sed -n 's#.*/checkpoints/\([0-9][0-9]*\)/commit_success\.txt$#\1#p' | sort -n | tail -n 1)"
  record="$( { gcloud storage ls "$workdir/config*.yaml" 2>/dev/null || true; } \
             | sed -n -e 's#.*/config\.yaml$#-1 0 &#p' \
                      -e 's#.*/config\.resumed-\([0-9][0-9]*\)\.yaml$#\1 0 &#p' \
                      -e 's#.*/config\.resumed-\([0-9][0-9]*\)-\([0-9][0-9]*\)\.yaml$#\1 \2 &#p' \
             | sort -n -k1,1 -k2,2 | tail -n 1 | cut -d' ' -f3-)"
  if [[ -n "$record" ]]; then
    # The record is jaxctx.config.to_yaml's block YAML: a top-level "train:" and its "  steps: N".
    target="$(gcloud storage cat "$record" 2>/dev/null \
              | awk '/^[^ #]/ { section = $1 } section == "train:" && $1 == "steps:" { print $2; exit }' || true)"
  fi
  [[ "$target" =~ ^[0-9]+$ ]] || target=0
  echo "${step:-0} $target"
}

# job_status_command RUN: the shell command that prints, on a worker, one line
#   jaxctx-job HOSTNAME RUN running | exit STATUS | none
# (running includes starting: tpu/launch leaves RUN.pid empty until train.py has a pid; none: no such run on
# this worker -- never launched here, or the VM was recreated).
job_status_command() {
  local logs="$REMOTE_LOGS/$1"
  echo "if [ -f $logs.exit ]; then s=\"exit \$(cat $logs.exit)\"; elif [ -f $logs.pid ] && { [ ! -s $logs.pid ] || kill -0 \"\$(cat $logs.pid)\" 2>/dev/null; }; then s=running; else s=none; fi; echo \"jaxctx-job \$(hostname) $1 \$s\""
}

# current_run [NAME]: NAME, else TPU_RUN, else the run tpu/launch started last (read from worker 0).
current_run() {
  local name="${1:-${TPU_RUN:-}}"
  if [[ -z "$name" ]]; then
    name="$(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=0 \
            --command="cat $REMOTE_LOGS/current" 2>/dev/null || true)"
    [[ -n "$name" ]] || die "no run launched on $TPU_NAME yet: pass --run NAME"
  fi
  check_run_name "$name"
  echo "$name"
}
