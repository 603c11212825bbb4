"""Command line of `apfl_jax.studies.beta_sweep`: AP-FL runs re-scored at several beta values.

  python experiments/beta_sweep.py --runs=docs/results/dropout/runs/apfl \
      --betas=0.001,0.01,0.1,0.5,1.0 --out=docs/results/dropout/beta_sweep.md

Other friend settings, scored on the same runs (each retrains every client's friend):

  python experiments/beta_sweep.py --runs=docs/results/dirichlet/runs/apfl --betas=0.1,1.0 \
      --friend_settings="apfl_friend_learning_rate=0.01;apfl_friend_labels=all,\
apfl_synthetic_per_class=100" \
      --out=docs/results/dirichlet/friend_study.md
"""

import os
import sys

from absl import app, flags, logging

from apfl_jax.core.errors import UserError
from apfl_jax.studies import beta_sweep, outputs

flags.DEFINE_string('runs', None, 'Folder holding seed*/ workdirs of finished AP-FL runs.')
flags.DEFINE_string('betas', '0.001,0.01,0.1,0.5,1.0', 'Comma-separated beta values.')
flags.DEFINE_string(
  'friend_settings',
  '',
  "Friend settings to score besides the run's own: ';'-separated, each comma-separated "
  f'FLAG=VALUE pairs with FLAG one of {", ".join(beta_sweep.FRIEND_FLAGS)}.',
)
flags.DEFINE_string(
  'seeds', '', "Comma-separated seeds: the seed<k>/ workdirs to score ('': every seed*/)."
)
flags.DEFINE_string('out', None, 'Markdown file to write the table to.')
FLAGS = flags.FLAGS


def main(argv):
  logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) > 1:
      raise UserError(f'unexpected argument {argv[1]!r}: flags are written --name=value')
    if not FLAGS.runs or not FLAGS.out:
      raise UserError('--runs and --out are required')
    betas = beta_sweep.parse_betas(FLAGS.betas)
    friend_settings = beta_sweep.parse_friend_settings(FLAGS.friend_settings)
    workdirs = beta_sweep.seed_workdirs(FLAGS.runs, FLAGS.seeds)
    outputs.check_output_file(FLAGS.out, 'out')  # before the work, not after
    per_run = [beta_sweep.evaluate_run(w, betas, friend_settings) for w in workdirs]
  except UserError as e:
    sys.exit(f'error: {e}')
  text = beta_sweep.table(FLAGS.runs, per_run, betas)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)
