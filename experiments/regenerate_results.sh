#!/usr/bin/env bash
# Regenerates the result files of docs/results with the commands the README states, one
# section at a time, so that one prepared command on a GPU machine refreshes them all.
#
#   bash experiments/regenerate_results.sh SECTION...   (from the project root)
#
# Sections (each writes docs/results/<folder>; finished runs in <folder>/runs are re-read):
#   dirichlet   issue #10's table: fashion_mnist.flags, 9 algorithms, seeds 0-2, 50 rounds,
#               then the beta sweep, the friend study and the generator study on its
#               AP-FL runs, then AP-FL taught by the clients' local models
#               (docs/results/client_teachers)
#   dropout     fashion_mnist_dropout.flags, 9 algorithms, seeds 0-2, then the beta sweep and
#               the friend study on its AP-FL runs, then AP-FL taught by the clients' local
#               models (docs/results/client_teachers_dropout)
#   async       fashion_mnist_async.flags: FedBuff and sync FedAvg, seeds 0-2, plot_async
#   pfllib      PFLlib's Fashion-MNIST settings (rounds: $PFLLIB_ROUNDS, default 12)
#
# With $OUT set (the device tool's output folder), the result files, without the runs, are
# packed into $OUT/results.tar.gz. Runtime: about 12 s per 50-round FedAvg run on an H100;
# on 2 CPU cores the dirichlet section takes hours (an AP-FL round trains in ~38 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PFLLIB_ROUNDS=${PFLLIB_ROUNDS:-12}
BETAS=0.001,0.01,0.1,0.5,1.0
FRIEND_BETAS=0.01,0.1,0.5,1.0
FRIENDS="apfl_friend_learning_rate=0.005;apfl_friend_learning_rate=0.01;apfl_synthetic_per_class=100"

dirichlet() {
  $PY experiments/compare.py --flagfile=fashion_mnist.flags \
    --algorithms=fedavg,local,fedprox,ditto,fedrep,apfl_deng,fedavg_ft,fedgen,apfl \
    --algorithm_flags=fedgen.fedgen_alpha=2,fedgen.fedgen_beta=2 \
    --seeds=0,1,2 --out=docs/results/dirichlet
  $PY experiments/beta_sweep.py --runs=docs/results/dirichlet/runs/apfl --betas=$BETAS \
    --out=docs/results/dirichlet/beta_sweep.md
  $PY experiments/beta_sweep.py --runs=docs/results/dirichlet/runs/apfl --betas=$FRIEND_BETAS \
    --friend_settings="apfl_friend_learning_rate=0.005;apfl_friend_learning_rate=0.01;apfl_friend_labels=all;apfl_synthetic_per_class=100;apfl_friend_init=global" \
    --out=docs/results/dirichlet/friend_study.md
  $PY experiments/generator_study.py --runs=docs/results/dirichlet/runs/apfl --seeds=0,1,2 \
    --generator_settings="diversity_pairs=same_label;global_teacher_weight=0;global_teacher_weight=0,apfl_friend_learning_rate=0.005" \
    --out=docs/results/dirichlet/generator_study.md
  client_teachers fashion_mnist.flags docs/results/client_teachers
}

# AP-FL whose generator the clients' local models teach (--global_teacher_weight=0), with
# the beta sweep and the gentle friend on its runs.
client_teachers() {
  $PY experiments/compare.py --flagfile=$1 --algorithms=apfl \
    --algorithm_flags=apfl.global_teacher_weight=0 --seeds=0,1,2 --out=$2
  $PY experiments/beta_sweep.py --runs=$2/runs/apfl/global_teacher_weight=0 --betas=$FRIEND_BETAS \
    --friend_settings=apfl_friend_learning_rate=0.005 --out=$2/beta_sweep.md
}

dropout() {
  $PY experiments/compare.py --flagfile=fashion_mnist_dropout.flags \
    --algorithms=fedavg,local,fedprox,ditto,fedrep,apfl_deng,fedavg_ft,fedgen,apfl \
    --algorithm_flags=fedgen.fedgen_alpha=2,fedgen.fedgen_beta=2 \
    --seeds=0,1,2 --out=docs/results/dropout
  $PY experiments/beta_sweep.py --runs=docs/results/dropout/runs/apfl --betas=$BETAS \
    --out=docs/results/dropout/beta_sweep.md
  $PY experiments/beta_sweep.py --runs=docs/results/dropout/runs/apfl --betas=$FRIEND_BETAS \
    --friend_settings="$FRIENDS" --out=docs/results/dropout/friend_study.md
  client_teachers fashion_mnist_dropout.flags docs/results/client_teachers_dropout
}

async() {
  local runs=docs/results/async/runs
  for seed in 0 1 2; do
    $PY experiments/main.py --flagfile=fashion_mnist_async.flags --seed=$seed \
      --workdir=$runs/fedbuff/seed$seed
    $PY experiments/main.py --flagfile=fashion_mnist_async.flags --server=sync --num_rounds=24 \
      --seed=$seed --workdir=$runs/sync/seed$seed
  done
  $PY experiments/plot_async.py --runs=$runs/sync,$runs/fedbuff --out=docs/results/async \
    --target=0.6 --metric=active_personalized_acc
}

pfllib() {
  local rounds=--num_rounds=$PFLLIB_ROUNDS
  $PY experiments/compare.py --flagfile=pfllib_fmnist.flags $rounds --seeds=0 \
    --algorithms=fedavg,fedprox,fedgen,ditto,fedrep,apfl_deng --out=docs/results/pfllib_dir
  $PY experiments/compare.py --flagfile=pfllib_fmnist.flags $rounds --seeds=0 \
    --algorithms=apfl_deng --sweep=apfl_deng_alpha:1.0 --out=docs/results/pfllib_dir
  $PY experiments/compare.py --flagfile=pfllib_fmnist_pat.flags $rounds --seeds=0 \
    --algorithms=fedavg,ditto,fedrep --out=docs/results/pfllib_pat
  $PY experiments/pfllib_check.py \
    --runs=dirichlet:docs/results/pfllib_dir,pathological:docs/results/pfllib_pat \
    --report=docs/results/pfllib/results.md
}

if [ $# -eq 0 ]; then
  echo "usage: bash experiments/regenerate_results.sh SECTION... (dirichlet dropout async pfllib)" >&2
  exit 2
fi
for section in "$@"; do
  case $section in
    dirichlet | dropout | async | pfllib) ;;
    *) echo "error: unknown section '$section' (dirichlet, dropout, async, pfllib)" >&2; exit 2 ;;
  esac
done
for section in "$@"; do
  echo "== $section $(date -u +%H:%M:%S)"
  SECONDS=0
  $section
  echo "== $section done in ${SECONDS}s"
done
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" --exclude='runs' docs/results
fi
