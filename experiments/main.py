"""Runs one federated experiment: `python experiments/main.py --flagfile=cifar10.flags`.

A bare flagfile name that is not in the working directory is looked up in experiments/.
Invalid flags, missing data and diverged training end with one line on stderr and a
non-zero exit status.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from apfl_jax import config as config_lib  # noqa: E402
from apfl_jax import sharding  # noqa: E402
from apfl_jax import train  # noqa: E402
from apfl_jax.errors import UserError  # noqa: E402

config_lib.define_flags()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keeps orbax's per-save INFO lines out
  try:
    config = config_lib.from_flags(flags.FLAGS)
    if config.distributed:
      sharding.maybe_initialize_distributed(auto_detect=True)
    train.train_and_evaluate(config, config.workdir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  try:
    sys.argv = config_lib.resolve_flagfile_args(sys.argv, os.path.dirname(
        os.path.abspath(__file__)))
  except UserError as e:
    sys.exit(f'error: {e}')
  app.run(main)
