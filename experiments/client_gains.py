"""Where one method gains over another: per-client accuracy gain, small vs large clients.

Reads the final round of finished compare.py runs (`<runs>/<algorithm>/seed<k>`) and
prints, for each algorithm, its mean per-client personalized accuracy gain over
--reference on the clients below and above the median training-set size (clients of all
seeds pooled):

  python experiments/client_gains.py --runs=docs/results/dirichlet/runs \
      --algorithms=apfl,fedrep,ditto --reference=local --seeds=0,1,2
"""

from absl import app

from apfl_jax.studies import client_gains

if __name__ == '__main__':
  client_gains.define_flags()
  app.run(client_gains.main)
