#!/usr/bin/env bash
# Every GPU check in one command, under 5 minutes on an H200 (issue 19): the fused op's CUDA build,
# every CUDA test of the suite, the fused op's kernel bandwidth against a copy and its wall time
# against eager, and --cuda training speed against 4 pinned CPU threads. Prints one table; the full
# output is in LOG. Stages and their limits: benchmarks/gpu_check.py. docs/speed.md says how to run it.
#
#   bash benchmarks/gpu_check.sh LOG
#
# Exit 0: every check passed and met its target; 1: something failed or missed; 2: no GPU (one line),
# or gymnasium missing with no .whl/ to install it from.
set -uo pipefail
export GPU_CHECK_START=$(date +%s)
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_check.sh LOGFILE" >&2; exit 2; }
log=$1
: > "$log" || exit 2
PY=${PYTHON:-python3}
say() { echo "$1" | tee -a "$log"; }

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$log" 2>&1; then
  say "gpu_check: no CUDA GPU visible to torch here (torch.cuda.is_available() is false); nothing was run"
  exit 2
fi

# The H200 machine has torch but not gymnasium, mujoco or tyro: the wheels travel in .whl/
# (fetched by shared/gpu/fetch-wheels.sh). This is that script's install line.
if ! $PY -c 'import gymnasium, mujoco, tyro' >>"$log" 2>&1; then
  [ -d .whl ] || { say "gpu_check: gymnasium, mujoco or tyro is missing and there is no .whl/ to install them from (carry .whl)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/site || { say "gpu_check: installing .whl/*.whl failed (see $log)"; exit 1; }
  export GPU_CHECK_WHEELS="$(ls .whl | wc -l) wheels from .whl installed in $(( $(date +%s) - GPU_CHECK_START )) s"
fi

$PY benchmarks/gpu_check.py "$log"
