"""Runs one federated experiment: `python experiments/main.py --flagfile=cifar10.flags`.

A bare flagfile name that is not in the working directory is looked up in experiments/.
`--seeds=0,1,2` trains those seeds as one program (<workdir>/seed<k> each).
Invalid flags, missing data, diverged training and an interrupt (Ctrl-C, SIGTERM, SIGHUP)
end with one line on stderr and a non-zero exit status; `--help` lists the project's flags
by component and exits 0.
"""

import os
import signal
import sys

# Signals that end a run as Ctrl-C does. Until main() turns them into KeyboardInterrupt
# (while jax and the project import), they end the process with one line.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_before_start(signum, frame):
  # Nothing is written before main() starts: end at once, from wherever the signal landed
  # (an exception raised there could be swallowed, e.g. by a garbage-collector callback).
  del frame
  name = signal.Signals(signum).name
  os.write(2, f'error: {name} before the run started; rerun the same command\n'.encode())
  os._exit(1)


for _signal in _STOP_SIGNALS:
  signal.signal(_signal, _stop_before_start)

from absl import app, flags, logging  # noqa: E402 -- after the signal handlers

from apfl_jax.config import config as config_lib  # noqa: E402
from apfl_jax.core import sharding  # noqa: E402
from apfl_jax.core.errors import ConfigError, UserError  # noqa: E402
from apfl_jax.runner import batch, callbacks, checkpoints, train  # noqa: E402
from apfl_jax.runner import workdir as workdir_lib  # noqa: E402

config_lib.define_flags()
flags.DEFINE_list(
  'seeds',
  [],
  'Several seeds as ONE program (the experiment axis, apfl_jax/runner/batch.py): seed k '
  'runs in <workdir>/seed<k>, each its own run folder; --seed is then not used.',
)

_HELP_ARGS = ('--help', '-h', '-?', '--helpshort', '--helpfull')


def _interrupt(signum, frame):
  """Ctrl-C, SIGTERM and SIGHUP end the run (the round loop turns it into one line;
  it also stops at the next round if the KeyboardInterrupt is swallowed where it lands)."""
  del signum, frame
  callbacks.request_stop()
  raise KeyboardInterrupt


def _parse_flags(argv):
  """absl's parsing, with a parse error (unknown flag, bad literal) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {str(e).splitlines()[0]} (see --help)')


def _train_seeds(config, seeds):
  """--seeds: the seeds of `config` as one program, <workdir>/seed<k> each."""
  try:
    values = [int(s) for s in seeds]
  except ValueError:
    raise ConfigError(f'--seeds must be integers like 0,1,2; got {",".join(seeds)}') from None
  if len(set(values)) < len(values):
    raise ConfigError(f'--seeds names a seed more than once: {",".join(seeds)}')
  root = config.workdir or workdir_lib.default_workdir(config)
  configs = [config.replace(seed=s, workdir=os.path.join(root, f'seed{s}')) for s in values]
  outcomes = batch.train_and_evaluate_batch(configs, [c.workdir for c in configs])
  failed = [f'seed {c.seed}: {o}' for c, o in zip(configs, outcomes) if isinstance(o, Exception)]
  if failed:
    raise UserError(f'{"; ".join(failed)} (the other seeds finished in {root})')


def main(argv):
  if len(argv) > 1:
    # absl passes on what is not a flag: a stray word, or a flagfile line without dashes.
    sys.exit(
      f'error: unexpected argument {argv[1]!r}: flags are written --name=value, on the '
      'command line and in a --flagfile (see --help)'
    )
  logging.set_verbosity(logging.WARNING)  # keeps orbax's per-save INFO lines out
  sys.stderr = checkpoints.WithoutClosedLoopTracebacks(sys.stderr)
  for stop in (*_STOP_SIGNALS, signal.SIGINT):
    signal.signal(stop, _interrupt)
  try:
    config = config_lib.from_flags(flags.FLAGS)
    if config.distributed:
      sharding.maybe_initialize_distributed(
        auto_detect=True, timeout_s=config.distributed_timeout_s
      )
    if flags.FLAGS.seeds:
      _train_seeds(config, flags.FLAGS.seeds)
    else:
      train.train_and_evaluate(config, config.workdir)
  # fail_fast: sys.exit with the line; in a multi-process run, the line names the process
  # that failed and the other processes are stopped.
  except UserError as e:
    sharding.fail_fast(str(e))
  except KeyboardInterrupt as e:
    sharding.fail_fast(str(e) or 'interrupted before the rounds started; rerun the same command')
  except Exception as e:
    if not sharding.in_job():
      raise
    sharding.fail_fast(f'{type(e).__name__}: {" ".join(str(e).split())[:300]}')


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
