"""AP-FL interpolation sweep: re-evaluates finished AP-FL runs for several beta values.

beta only enters personalization (theta_p = beta * theta_local + (1 - beta) * theta_friend);
local training, aggregation and generator training never read it. So the sweep restores
each run's final checkpoint and evaluates the personalized models for every beta, which
is exactly what separate runs would report at their final round, at the cost of one
evaluation per value.

  python experiments/beta_sweep.py --runs=docs/results/dropout/runs/apfl \
      --betas=0.001,0.01,0.1,0.5,1.0 --out=docs/results/beta_sweep.md
"""

import dataclasses
import glob
import os
import sys

from absl import app, flags, logging
import numpy as np

from apfl_jax import run_folder, train
from apfl_jax.errors import UserError

flags.DEFINE_string('runs', None, 'Folder holding seed*/ workdirs of finished AP-FL runs.')
flags.DEFINE_string('betas', '0.001,0.01,0.1,0.5,1.0', 'Comma-separated beta values.')
flags.DEFINE_string('out', None, 'Markdown file to write the table to.')
FLAGS = flags.FLAGS

METRICS = (
  'personalized_acc',
  'active_personalized_acc',
  'dropout_personalized_acc',
  'dropout_personalized_acc_no_label_prior',
)


def evaluate_run(workdir: str, betas: list[float]) -> dict[float, dict[str, float]]:
  """Final-round metrics of one AP-FL workdir for each beta."""
  algorithm = run_folder.read_config(workdir).algorithm
  if algorithm != 'apfl':
    raise UserError(f'--runs: {workdir} is a {algorithm} run, not apfl')
  experiment, state, _ = run_folder.restore_latest(workdir)
  results = {}
  for beta in betas:
    swept = dataclasses.replace(experiment, algorithm=experiment.algorithm.with_beta(beta))
    results[beta] = train.Evaluator(swept)(state)
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if not FLAGS.runs or not FLAGS.out:
      raise UserError('--runs and --out are required')
    betas = [float(b) for b in FLAGS.betas.split(',')]
    workdirs = sorted(glob.glob(os.path.join(FLAGS.runs, 'seed*')))
    if not workdirs:
      raise UserError(f'--runs: no seed*/ folders in {FLAGS.runs}')
    per_run = [evaluate_run(w, betas) for w in workdirs]
  except UserError as e:
    sys.exit(f'error: {e}')
  lines = [
    f'Seeds: {len(workdirs)} runs in `{FLAGS.runs}`; final-round accuracy, '
    'mean ± std (population) over seeds.',
    '',
    '| beta | ' + ' | '.join(METRICS) + ' |',
    '|---|' + '---|' * len(METRICS),
  ]
  for beta in betas:
    cells = []
    for metric in METRICS:
      values = [r[beta].get(metric) for r in per_run if r[beta].get(metric) is not None]
      cells.append(f'{np.mean(values):.4f} ± {np.std(values):.4f}' if values else 'n/a')
    lines.append(f'| {beta:g} | ' + ' | '.join(cells) + ' |')
  table = '\n'.join(lines) + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
