"""N experiments in one jitted program against N runs one after another.

  python experiments/bench_experiment_axis.py --flagfile=fashion_mnist.flags \
      --num_rounds=3 --local_steps=5 --experiments=1,3,8 --out=/tmp/bench_axis

For each N, trains the seeds 0..N-1 of --algorithm twice: as N separate
`train_and_evaluate` runs (each compiles its round, as compare.py --noexperiment_axis
does) and as one `train_and_evaluate_batch` program. Prints, per N, the wall time of each,
their ratio, and the time of the first round (compilation included) and of a later round.
Every flag of main.py is accepted; --workdir and --seed are set per run under --out.
"""

import os
import shutil
import sys
import time

from absl import app, flags, logging
import jax

from apfl_jax.config import config as config_lib
from apfl_jax.core.errors import UserError
from apfl_jax.runner import batch, run_folder, train

config_lib.define_flags()
flags.DEFINE_list('experiments', ['1', '3', '8'], 'Numbers of experiments to compare.')
flags.DEFINE_string('out', '', 'Scratch folder for the runs (emptied first; required).')
FLAGS = flags.FLAGS


def round_times(workdirs: list[str]) -> tuple[float, float]:
  """(first round's elapsed_s, mean elapsed_s of a later round) over the runs' rows."""
  firsts, laters = [], []
  for workdir in workdirs:
    elapsed = [r['elapsed_s'] for r in run_folder.read_metrics(workdir)]
    firsts.append(elapsed[0])
    if len(elapsed) > 1:
      laters.append((elapsed[-1] - elapsed[0]) / (len(elapsed) - 1))
  return max(firsts), (sum(laters) / len(laters) if laters else float('nan'))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if not FLAGS.out:
      raise UserError('--out is required: a scratch folder for the runs')
    counts = [int(n) for n in FLAGS.experiments]
    if any(n < 1 for n in counts):
      raise UserError(f'--experiments must be positive integers, got {FLAGS.experiments}')
    base = config_lib.from_flags(FLAGS).replace(eval_every=1, checkpoint_every=10**6, verbose=False)
    shutil.rmtree(FLAGS.out, ignore_errors=True)
    print(
      f'{base.algorithm}, {base.num_clients} clients, {base.num_rounds} rounds, '
      f'{jax.devices()[0].device_kind} x{jax.device_count()}'
    )
    print(
      '| experiments | one after another (s) | one program, taking turns (s) | one program, '
      'side by side (s) | first round: separate / turns / side by side (s) | later round: '
      'separate x N / turns / side by side (s) |'
    )
    print('|---|---|---|---|---|---|')
    for n in counts:
      configs = [base.replace(seed=s) for s in range(n)]
      folder = os.path.join(FLAGS.out, f'n{n}')
      sequential = [os.path.join(folder, 'sequential', f'seed{s}') for s in range(n)]
      t0 = time.perf_counter()
      for config, workdir in zip(configs, sequential):
        train.train_and_evaluate(config, workdir)
      times = {'sequential': time.perf_counter() - t0}
      rounds = {'sequential': round_times(sequential)}
      for mode, side_by_side in (('turns', False), ('side', True)):
        workdirs = [os.path.join(folder, mode, f'seed{s}') for s in range(n)]
        t0 = time.perf_counter()
        batch.train_and_evaluate_batch(configs, workdirs, side_by_side=side_by_side)
        times[mode] = time.perf_counter() - t0
        rounds[mode] = round_times(workdirs)
      first = ' / '.join(f'{rounds[m][0]:.1f}' for m in ('sequential', 'turns', 'side'))
      later = ' / '.join(
        f'{rounds[m][1]:.2f}' + (f' x {n}' if m == 'sequential' else '')
        for m in ('sequential', 'turns', 'side')
      )
      print(
        f'| {n} | {times["sequential"]:.1f} | {times["turns"]:.1f} '
        f'({times["turns"] / times["sequential"]:.2f}x) | {times["side"]:.1f} '
        f'({times["side"] / times["sequential"]:.2f}x) | {first} | {later} |',
        flush=True,
      )
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  sys.argv = config_lib.resolve_flagfile_args(sys.argv)
  app.run(main)
