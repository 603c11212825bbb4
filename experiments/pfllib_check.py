"""Puts our accuracies beside PFLlib's published Fashion-MNIST table.

  python experiments/compare.py --flagfile=pfllib_fmnist.flags --num_rounds=12 --seeds=0 \
      --algorithms=fedavg,fedprox,fedgen,ditto,fedrep,apfl_deng --out=docs/results/pfllib_dir
  python experiments/compare.py --flagfile=pfllib_fmnist.flags --num_rounds=12 --seeds=0 \
      --algorithms=apfl_deng --sweep=apfl_deng_alpha:1.0 --out=docs/results/pfllib_dir
  python experiments/compare.py --flagfile=pfllib_fmnist_pat.flags --num_rounds=12 \
      --seeds=0 --algorithms=fedavg,ditto,fedrep --out=docs/results/pfllib_pat
  python experiments/pfllib_check.py \
      --runs=dirichlet:docs/results/pfllib_dir,pathological:docs/results/pfllib_pat \
      --report=docs/results/pfllib/results.md

PFLlib (benchmark page of its documentation) reports, for 20 clients, each client's data
split 75/25 train/test, batch 10, 1 local epoch, the 4-layer CNN, the best test accuracy
over its rounds, sample-weighted over clients. Our counterpart is the best
`personalized_acc_weighted` over the evaluated rounds (for FedAvg, FedProx and FedGen the
personalized model is the global one, as in PFLlib's evaluation). Runs are read from
<folder>/runs/<algorithm>[/<flag>=<value>]/seed<k>/ as compare.py writes them, finished or
still running; a run whose config is not PFLlib's setting is refused with the flag that
differs. That includes PFLlib's defaults where ours follow the papers (ALGORITHM_SETTING:
FedRep's 1 head epoch, FedGen's PFLlib-style regulariser and generator optimizer), which
`pfllib_fmnist*.flags` pin; a config.json from before such a flag existed had PFLlib's
behaviour (BEFORE_FLAG).
"""

from absl import app

from apfl_jax.studies import pfllib_check

if __name__ == '__main__':
  pfllib_check.define_flags()
  app.run(pfllib_check.main)
