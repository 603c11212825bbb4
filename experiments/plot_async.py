"""Accuracy against virtual time for sync and async runs, and the staleness histogram.

  python experiments/plot_async.py \
      --runs=docs/results/async/runs/sync,docs/results/async/runs/fedbuff \
      --out=docs/results/async --target=0.8

Reads each workdir's metrics.jsonl (which logs every applied update's staleness in async
mode; only at evaluated steps, so the histogram covers those steps' buffers), writes
accuracy_vs_virtual_time.png, staleness_histogram.png and summary.md with the virtual
time to --target accuracy and the accuracy of each run at the shortest run's final time.
"""

import os
import sys

from absl import app, flags

from apfl_jax import plots, run_folder

flags.DEFINE_string('runs', None, 'Comma-separated workdirs.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_float('target', 0.8, 'Target personalized accuracy.')
flags.DEFINE_string('metric', 'personalized_acc', 'Metric to plot.')
FLAGS = flags.FLAGS


def read_rows(workdir):
  rows = run_folder.read_metrics(workdir)
  if not rows:
    sys.exit(f'error: --runs: {os.path.join(workdir, run_folder.METRICS)} not found or empty')
  return rows


def main(argv):
  del argv
  if not FLAGS.runs or not FLAGS.out:
    sys.exit('error: --runs and --out are required')
  os.makedirs(FLAGS.out, exist_ok=True)
  series, staleness, lines = {}, [], []
  for workdir in FLAGS.runs.split(','):
    rows = read_rows(workdir)
    server = run_folder.read_config_values(workdir)['server']
    label = f'{os.path.basename(workdir.rstrip("/"))} ({server})'
    series[label] = ([r['virtual_time'] for r in rows], [r[FLAGS.metric] for r in rows])
    for r in rows:
      staleness.extend(r.get('staleness', []))
  budget = min(times[-1] for times, _ in series.values())
  lines += [
    f'| run | final virtual time | {FLAGS.metric} at time {budget:.0f} | '
    f'time to {FLAGS.target:g} |',
    '|---|---|---|---|',
  ]
  for label, (times, values) in series.items():
    at_budget = [v for t, v in zip(times, values) if t <= budget]
    reached = plots.virtual_time_to_target(times, values, FLAGS.target)
    lines.append(
      f'| {label} | {times[-1]:.0f} | '
      f'{at_budget[-1] if at_budget else float("nan"):.4f} | '
      f'{"not reached" if reached is None else f"{reached:.0f}"} |'
    )
  plots.plot_accuracy_vs_virtual_time(
    series, os.path.join(FLAGS.out, 'accuracy_vs_virtual_time.png'), FLAGS.metric
  )
  if staleness:
    plots.plot_staleness_histogram(staleness, os.path.join(FLAGS.out, 'staleness_histogram.png'))
  with open(os.path.join(FLAGS.out, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
