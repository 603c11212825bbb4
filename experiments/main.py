"""Runs one federated experiment: `python experiments/main.py --flagfile=cifar10.flags`.

A bare flagfile name that is not in the working directory is looked up in experiments/.
Invalid flags, missing data, diverged training and an interrupt (Ctrl-C, SIGTERM) end
with one line on stderr and a non-zero exit status; `--help` lists the project's flags
by component and exits 0.
"""

import os
import signal
import sys

from absl import app, flags, logging

from apfl_jax.config import config as config_lib
from apfl_jax.core import sharding
from apfl_jax.core.errors import UserError
from apfl_jax.runner import train

config_lib.define_flags()

_HELP_ARGS = ('--help', '-h', '-?', '--helpshort', '--helpfull')


def _interrupt(signum, frame):
  """SIGTERM ends the run as Ctrl-C does (the round loop turns it into one line)."""
  del signum, frame
  raise KeyboardInterrupt


def _parse_flags(argv):
  """absl's parsing, with a parse error (unknown flag, bad literal) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {str(e).splitlines()[0]} (see --help)')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keeps orbax's per-save INFO lines out
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    config = config_lib.from_flags(flags.FLAGS)
    if config.distributed:
      sharding.maybe_initialize_distributed(auto_detect=True)
    train.train_and_evaluate(config, config.workdir)
  except UserError as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt as e:
    sys.exit(f'error: {e or "interrupted before the rounds started; rerun the same command"}')


if __name__ == '__main__':
  asked = [arg for arg in sys.argv[1:] if arg.split('=')[0] in _HELP_ARGS]
  if asked:
    print(config_lib.format_help(os.path.basename(sys.argv[0])))
    if '--helpfull' in asked:
      print('\n' + flags.FLAGS.get_help())
    sys.exit(0)
  try:
    sys.argv = config_lib.resolve_flagfile_args(
      sys.argv, os.path.dirname(os.path.abspath(__file__))
    )
  except UserError as e:
    sys.exit(f'error: {e}')
  app.run(main, flags_parser=_parse_flags)
