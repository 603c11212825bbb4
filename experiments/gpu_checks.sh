#!/usr/bin/env bash
# The checks owed to a GPU, as ONE command for a lent accelerator (the device tool allows
# 10 min a call, 15 min a session). From the project root, after
# `bash ../shared/gpu/prepare.sh` here, with carry [".gpu"]:
#
#   source .gpu/env.sh && bash experiments/gpu_checks.sh
#
# Steps, each under its own time limit (530 s in all at most); logs and JSON go to
# $OUT (the device tool's folder that comes back), else /tmp/gpu_checks:
#   1. tests/test_batch.py, test_golden.py, test_cohort.py at the GPU's default TF32
#      matmuls (the experiment axis equals separate runs; golden values; the client map);
#   2. the experiment axis, 1 and 8 seeds (goal: 8 side by side in at most 1.5x one);
#   3. the client sweep, 10 to 10,000 clients (goal: 10,000 in chunks of 1000 at >= 80%
#      of the 1000-client samples/s), memory analysis included.
# Figures go to docs/benchmarks.md with the card, commit and this command.
# GPU_CHECKS_QUICK=1 runs the same steps cut down on any machine (2 CPU cores: 3 min 50 s),
# the CPU-checkable counterpart: it proves the commands run, not the figures.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
python=$(command -v python3 || command -v python)

step() {  # step NAME SECONDS COMMAND...: runs it under a limit, logs to $out/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc in $(($(date +%s) - start)) s"
  tail -n 14 "$out/$name.log"
}

git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
$python -c 'import jax; print("jax", jax.__version__, jax.devices())'
if [ -n "${GPU_CHECKS_QUICK:-}" ]; then
  step tests 300 $python -m pytest -q -x -p no:cacheprovider -m 'not slow' tests/test_batch.py
  step experiment_axis 300 $python experiments/bench_experiment_axis.py \
    --flagfile=fashion_mnist.flags --num_rounds=2 --local_steps=2 --experiments=1,2 \
    --out=/tmp/gpu_checks_axis
  step client_sweep 300 $python experiments/benchmark.py --preset=sweep --max_clients=10 \
    --backends=jax_vmap --rounds=1 --json="$out/client_sweep.json"
else
  step tests 180 $python -m pytest -q -n 4 -p no:cacheprovider \
    tests/test_batch.py tests/test_golden.py tests/test_cohort.py
  step experiment_axis 150 $python experiments/bench_experiment_axis.py \
    --flagfile=fashion_mnist.flags --num_rounds=3 --local_steps=5 --experiments=1,8 \
    --out=/tmp/gpu_checks_axis
  step client_sweep 200 $python experiments/benchmark.py --preset=sweep --device=gpu \
    --backends=jax_vmap --json="$out/client_sweep.json"
fi
