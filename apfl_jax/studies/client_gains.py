"""Where one method gains over another: per-client accuracy gain, small vs large clients.

Reads the final round of finished compare.py runs (`<runs>/<algorithm>/seed<k>`) and
prints, for each algorithm, its mean per-client personalized accuracy gain over
--reference on the clients below and above the median training-set size (clients of all
seeds pooled):

  python experiments/client_gains.py --runs=docs/results/dirichlet/runs \
      --algorithms=apfl,fedrep,ditto --reference=local --seeds=0,1,2
"""

import json
import os
import sys

from absl import flags
import numpy as np

from apfl_jax.core.errors import UserError
from apfl_jax.runner import run_folder
from apfl_jax.studies import results


def define_flags() -> None:
  """Defines the command line of experiments/client_gains.py (once per process)."""
  if 'runs' in flags.FLAGS:
    return
  flags.DEFINE_string('runs', None, 'Folder holding <algorithm>/seed<k>/ run folders.')
  flags.DEFINE_list('algorithms', [], 'Algorithms (sub-folders of --runs) to compare.')
  flags.DEFINE_string('reference', 'local', 'The algorithm the gains are measured against.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (seed<k>/ folders) to pool.')


FLAGS = flags.FLAGS


def final_client_accs(workdir: str) -> list[float]:
  rows = [r for r in run_folder.read_metrics(workdir) if 'client_personalized_acc' in r]
  if not rows:
    raise UserError(f'--runs: {workdir} has no evaluated round with per-client accuracies')
  return rows[-1]['client_personalized_acc']


def train_sizes(workdir: str) -> list[int]:
  path = os.path.join(workdir, 'partition.json')
  try:
    with open(path) as f:
      return [sum(row) for row in json.load(f)['train_counts']]
  except OSError:
    raise UserError(f'--runs: no {path}') from None


def main(argv):
  del argv
  try:
    if not FLAGS.runs or not FLAGS.algorithms:
      raise UserError('--runs and --algorithms are required')
    methods = [FLAGS.reference, *(a for a in FLAGS.algorithms if a != FLAGS.reference)]
    accs: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    sizes: list[np.ndarray] = []
    for seed in FLAGS.seeds:
      folders = {m: os.path.join(FLAGS.runs, m, f'seed{seed}') for m in methods}
      for m, folder in folders.items():
        if not os.path.isdir(folder):
          raise UserError(f'--runs/--seeds: no run folder {folder}')
        accs[m].append(np.asarray(final_client_accs(folder), np.float64))
      seed_sizes = {m: train_sizes(f) for m, f in folders.items()}
      if len({tuple(s) for s in seed_sizes.values()}) > 1:
        raise UserError(f'--seeds: the runs of seed {seed} do not share one partition')
      sizes.append(np.asarray(seed_sizes[FLAGS.reference]))
    rows = results.gain_by_client_size(accs, sizes, FLAGS.reference)
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f'Gain in personalized accuracy over {FLAGS.reference} (points), per client, final round')
  print(f'(seeds {",".join(FLAGS.seeds)}; small/large: below/above the median training size)')
  print('| method | small clients | large clients | all clients |')
  print('|---|---|---|---|')
  for row in rows:
    cells = ' | '.join(f'{100 * row[k]:+.2f}' for k in ('small', 'large', 'all'))
    print(f'| {row["method"]} | {cells} |')
