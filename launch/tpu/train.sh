#!/usr/bin/env bash
# Train fvq_jax on a Cloud TPU VM pod slice. Every worker (host) of the slice runs the same
# command; `--multihost` lets jax.distributed.initialize() find the other workers by itself.
#
#   BUCKET=gs://my-bucket launch/tpu/train.sh --create --run=fvq16k
#   BUCKET=gs://my-bucket launch/tpu/train.sh --run=fvq262k \
#       --config=configs/tokenizer.py:paper,codebook=262144,bridge=L/8 -- --config.train.log_every=50
#   launch/tpu/train.sh --dry-run ...    print the commands instead of running them
#
# Steps: (--create) create the TPU VM if missing, or delete and recreate it if it was preempted;
# copy configs/ (and the wheel, INSTALL=wheel) to ~/$REMOTE_DIR on every worker; install
# jax[tpu] and fvq_jax into a venv there; run
#   python -m fvq_jax.main --multihost --config=CONFIG --workdir=$BUCKET/fvq_jax/RUN [extra flags]
# on all workers. Rerunning the same command resumes the run from its newest checkpoint.
#
# Options:
#   --run=NAME     the run's name; its workdir is $BUCKET/fvq_jax/NAME (required)
#   --config=SPEC  config file and argument (configs/tokenizer.py:paper)
#   --create       create the TPU VM first if it does not exist (or was preempted)
#   --detach       start the job in the background on the workers (log: ~/$REMOTE_DIR/train.log)
#   --stop         send SIGTERM to a detached job: it saves a checkpoint and exits
#   --dry-run      print the commands, run nothing
#   -- FLAGS       more fvq_jax.main flags, e.g. --config.train.num_steps=100000
#
# Settings (environment variables, defaults in brackets):
#   TPU_NAME [fvq-pod]   ZONE [us-central2-b]   PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v4-32]  TPU_VERSION [tpu-ubuntu2204-base]  SPOT [0; 1 = Spot VM]  (for --create)
#   BUCKET               gs:// bucket (or gs://bucket/prefix) for the workdirs (required)
#   INSTALL [git]        git:   pip install "fvq_jax @ git+$REPO_URL@$GIT_REF" on the workers
#                        wheel: build a wheel of this checkout here and copy it to the workers
#                        skip:  reuse what an earlier call installed
#   REPO_URL, GIT_REF [main]  for INSTALL=git (push your changes first)
#   PYTHON_VERSION [3.12]     the workers' venv Python (uv downloads it; the image's may be too old)
#   JAX_SPEC [jax[tpu]]       the jax requirement installed next to fvq_jax
#   REMOTE_DIR [fvq_jax_job]  folder in each worker's home holding configs/, the venv and logs
set -euo pipefail

TPU_NAME=${TPU_NAME:-fvq-pod}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
BUCKET=${BUCKET:-}
INSTALL=${INSTALL:-git}
REPO_URL=${REPO_URL:-}
GIT_REF=${GIT_REF:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
REMOTE_DIR=${REMOTE_DIR:-fvq_jax_job}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CONFIG=configs/tokenizer.py:paper
RUN=
CREATE=0 DETACH=0 STOP=0 DRY_RUN=0
EXTRA=()

die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# quote (shell-quote arguments, for printed and remote commands) and run (print under DRY_RUN).
source "$REPO_ROOT/launch/quote.sh"

while (( $# )); do
  case $1 in
    --run=*) RUN=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --create) CREATE=1 ;;
    --detach) DETACH=1 ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

gcloud_flags=(--zone="$ZONE")
[[ -n $PROJECT ]] && gcloud_flags+=(--project="$PROJECT")
on_all_workers() {
  (( DRY_RUN )) && echo "# on every worker: $1"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all --command="$1"
}

if (( STOP )); then
  on_all_workers "kill -TERM \$(cat $(quote "$REMOTE_DIR/train.pid"))"
  exit 0
fi

[[ -n $RUN ]] || die "--run=NAME is required (the workdir is \$BUCKET/fvq_jax/NAME; reuse it to resume)"
[[ $BUCKET == gs://* ]] || die "set BUCKET=gs://your-bucket: every worker reads and writes the workdir there"
case $INSTALL in
  git) [[ -n $REPO_URL ]] || die "INSTALL=git needs REPO_URL (e.g. https://github.com/you/fvq_jax.git)"
       PACKAGE="fvq_jax @ git+$REPO_URL@$GIT_REF" ;;
  wheel|skip) ;;
  *) die "INSTALL must be git, wheel or skip, not $INSTALL" ;;
esac
WORKDIR=${BUCKET%/}/fvq_jax/$RUN

# ------------------------------------------------------------------------------------- TPU VM
if (( CREATE )); then
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION")
  (( SPOT )) && create+=(--spot)
  if (( DRY_RUN )); then
    echo "# if $TPU_NAME does not exist (a PREEMPTED or TERMINATED one is deleted first):"
    quote "${create[@]}"
  else
    state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_flags[@]}" --format='value(state)' \
            2>/dev/null || true)
    case $state in
      READY) echo "TPU VM $TPU_NAME is ready" ;;
      PREEMPTED|TERMINATED)
        gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_flags[@]}" --quiet
        "${create[@]}" ;;
      "") "${create[@]}" ;;
      *) die "TPU VM $TPU_NAME is $state; wait until it is READY (or delete it)" ;;
    esac
  fi
fi

# ------------------------------------------------------------------------------------- install
# configs/ is not part of the package: every worker gets this checkout's copy next to its venv.
copy=("$REPO_ROOT/configs")
if [[ $INSTALL == wheel ]]; then
  version=$(sed -n 's/^version *= *//p' "$REPO_ROOT/setup.cfg")
  wheel=$REPO_ROOT/dist/fvq_jax-$version-py3-none-any.whl
  run python3 -m pip wheel --no-deps --wheel-dir="$REPO_ROOT/dist" "$REPO_ROOT"
  copy+=("$wheel")
  PACKAGE=./$(basename "$wheel")
fi
on_all_workers "mkdir -p $(quote "$REMOTE_DIR")"
run gcloud compute tpus tpu-vm scp --recurse "${copy[@]}" "$TPU_NAME:$REMOTE_DIR/" "${gcloud_flags[@]}" --worker=all
if [[ $INSTALL != skip ]]; then
  uv='"$HOME/.local/bin/uv"'
  on_all_workers "cd $(quote "$REMOTE_DIR") && { [ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } \
&& $uv venv --allow-existing --python $(quote "$PYTHON_VERSION") venv \
&& $uv pip install --python venv/bin/python --upgrade $(quote "$JAX_SPEC" "$PACKAGE")"
fi

# ------------------------------------------------------------------------------------- train
train=$(quote venv/bin/python -m fvq_jax.main --multihost --config="$CONFIG" --workdir="$WORKDIR" \
        ${EXTRA[@]+"${EXTRA[@]}"})
if (( DETACH )); then
  on_all_workers "cd $(quote "$REMOTE_DIR") && { nohup $train > train.log 2>&1 < /dev/null & echo \$! > train.pid; }"
  (( DRY_RUN )) || echo "started; worker 0's log: gcloud compute tpus tpu-vm ssh $TPU_NAME ${gcloud_flags[*]}" \
                        "--worker=0 --command='tail -f $REMOTE_DIR/train.log'"
else
  on_all_workers "cd $(quote "$REMOTE_DIR") && $train"
fi
