"""Command line of `apfl_jax.studies.generator_study`: fresh generators on finished AP-FL runs.

  python experiments/generator_study.py --runs=docs/results/dirichlet/runs/apfl --seeds=0 \
      --generator_settings="diversity_pairs=same_label" \
      --out=docs/results/dirichlet/generator_study.md
"""

import os
import sys

from absl import app, flags, logging

from apfl_jax.core.errors import UserError
from apfl_jax.studies import beta_sweep, generator_study, outputs

flags.DEFINE_string('runs', None, 'Folder holding seed*/ workdirs of finished AP-FL runs.')
flags.DEFINE_string('seeds', '0', 'Comma-separated seeds: the seed<k>/ workdirs to study.')
flags.DEFINE_string('betas', '0.01,0.1,0.5,1.0', 'Comma-separated beta values.')
flags.DEFINE_string(
  'generator_settings',
  'diversity_pairs=same_label',
  "Generator settings to retrain besides the run's own: ';'-separated, each comma-separated "
  f'FLAG=VALUE pairs with FLAG one of {", ".join(generator_study.GENERATOR_FLAGS)}.',
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
    settings = generator_study.parse_generator_settings(FLAGS.generator_settings)
    workdirs = beta_sweep.seed_workdirs(FLAGS.runs, FLAGS.seeds)
    outputs.check_output_file(FLAGS.out, 'out')  # before the work, not after
    per_run = [generator_study.evaluate_run(w, betas, settings) for w in workdirs]
  except UserError as e:
    sys.exit(f'error: {e}')
  command = 'python experiments/generator_study.py ' + ' '.join(sys.argv[1:])
  text = f'Command: `{command}`\n\n' + generator_study.table(FLAGS.runs, per_run, betas)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  app.run(main)
