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
#   apfl_async  apfl_async.flags: AP-FL under FedBuff, FedAsync and sync, FedBuff FedAvg and
#               Local, seeds 0-2, with the update budget cut to 60 and $APFL_ASYNC_CUTS
#               (empty it on a GPU for the flagfile's full setting: then also set
#               APFL_ASYNC_UPDATES=120)
#   pfllib      PFLlib's Fashion-MNIST settings (rounds: $PFLLIB_ROUNDS, default 12)
#
# With $OUT set (the device tool's output folder), the result files, without the runs, are
# packed into $OUT/results.tar.gz. Runtime: about 12 s per 50-round FedAvg run on an H100;
# on 2 CPU cores the dirichlet section takes hours (an AP-FL round trains in ~38 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PFLLIB_ROUNDS=${PFLLIB_ROUNDS:-12}
APFL_ASYNC_METRICS=active_personalized_acc,global_acc,dropout_personalized_acc,dropout_personalized_acc_no_label_prior,unseen_class_acc,unseen_class_seen_acc,unseen_class_acc_onehot_control
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

# The paper's dropout scenario served asynchronously, in virtual time. The flagfile's budget
# is 120 client updates (FedBuff: 40 server steps of 3) with the monopoly client gone after
# 30; APFL_ASYNC_UPDATES=60 halves the budget and keeps the dropout after 30 updates.
apfl_async() {
  local runs=docs/results/apfl_async/runs updates=${APFL_ASYNC_UPDATES:-60}
  local cuts=${APFL_ASYNC_CUTS---generator_steps=5 --apfl_synthetic_per_class=100}
  local fedbuff="--num_rounds=$((updates / 3)) --eval_every=$((updates / 15))"
  local fedasync="--server=fedasync --num_rounds=$updates --dropout_round=30 --eval_every=$((updates / 5))"
  local sync="--server=sync --num_rounds=$((updates / 5)) --dropout_round=6 --eval_every=$((updates / 20))"
  $PY experiments/main.py --flagfile=apfl_async.flags $cuts $sync --seeds=0,1,2 \
    --workdir=$runs/apfl_sync
  $PY experiments/main.py --flagfile=apfl_async.flags $cuts $sync --algorithm=local \
    --seeds=0,1,2 --workdir=$runs/local
  for seed in 0 1 2; do
    $PY experiments/main.py --flagfile=apfl_async.flags $cuts $fedbuff --seed=$seed \
      --workdir=$runs/apfl_fedbuff/seed$seed
    $PY experiments/main.py --flagfile=apfl_async.flags $cuts $fedbuff --algorithm=fedavg \
      --seed=$seed --workdir=$runs/fedavg_fedbuff/seed$seed
    $PY experiments/main.py --flagfile=apfl_async.flags $cuts $fedasync --seed=$seed \
      --workdir=$runs/apfl_fedasync/seed$seed
  done
  $PY experiments/plot_async.py \
    --runs=$runs/apfl_sync,$runs/apfl_fedbuff,$runs/apfl_fedasync,$runs/fedavg_fedbuff,$runs/local \
    --out=docs/results/apfl_async --target=0.95 --metric=active_personalized_acc \
    --final_metrics=$APFL_ASYNC_METRICS
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
  echo "usage: bash experiments/regenerate_results.sh SECTION... (dirichlet dropout async apfl_async pfllib)" >&2
  exit 2
fi
for section in "$@"; do
  case $section in
    dirichlet | dropout | async | apfl_async | pfllib) ;;
    *) echo "error: unknown section '$section' (dirichlet, dropout, async, apfl_async, pfllib)" >&2; exit 2 ;;
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
