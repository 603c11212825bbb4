"""Compares algorithms over seeds on identical partitions, with tables and plots.

  python experiments/compare.py --flagfile=fashion_mnist_dropout.flags \
      --algorithms=fedavg,local,fedgen,apfl --seeds=0,1,2 --out=docs/results/dropout

Every flag of main.py, plus --algorithms, --seeds, --out, --sweep=FLAG:v1,v2 and
--algorithm_flags=ALGORITHM.FLAG=VALUE; see `apfl_jax.studies.compare`.
"""

import sys

from absl import flags

from apfl_jax.core.errors import UserError
from apfl_jax.studies import compare

if __name__ == '__main__':
  try:
    sys.exit(compare.main(sys.argv))
  except (UserError, flags.Error) as e:
    sys.exit(f'error: {e}')
