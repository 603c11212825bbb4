"""Accuracy against virtual time for sync and async runs, and the staleness histogram.

  python experiments/plot_async.py \
      --runs=docs/results/async/runs/sync,docs/results/async/runs/fedbuff \
      --out=docs/results/async --target=0.6 --metric=active_personalized_acc

Each --runs item is one run's workdir or a folder of seed runs (its subfolders that hold a
metrics.jsonl, e.g. seed0, seed1, seed2); a folder is one row of the table and one colour of
the figure. Reads each run's metrics.jsonl (which logs every applied update's staleness in
async mode; only at evaluated steps, so the histogram covers those steps' buffers), writes
accuracy_vs_virtual_time.png, staleness_histogram.png and summary.md: per row, mean ± std
over its seeds of the final virtual time, of the accuracy at the budget (the shortest final
virtual time among the runs of the same seed; every folder needs the same seeds) and of the
virtual time to --target accuracy (over the seeds that reach it); with --final_metrics, a
second table of those metrics' last logged values (the end of each run's update budget).
"""

import os
import sys

from absl import flags

from apfl_jax.core.errors import ConfigError, UserError
from apfl_jax.runner import run_folder
from apfl_jax.studies import outputs, plots, results


def define_flags() -> None:
  """Defines the command line of experiments/plot_async.py (once per process)."""
  if 'runs' in flags.FLAGS:
    return
  flags.DEFINE_string('runs', None, 'Comma-separated workdirs or folders of seed workdirs.')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_float('target', 0.8, 'Target accuracy.')
  flags.DEFINE_string('metric', 'personalized_acc', 'Metric to plot.')
  flags.DEFINE_list(
    'final_metrics',
    [],
    "Metrics whose last logged value (the end of each run's update budget) the summary "
    'also tabulates, mean ± std over seeds.',
  )


FLAGS = flags.FLAGS


def seed_workdirs(folder: str) -> list[str]:
  """The run itself if `folder` is a workdir, else its subfolders that are workdirs."""
  if os.path.exists(os.path.join(folder, run_folder.METRICS)):
    return [folder]
  subfolders = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  runs = [
    os.path.join(folder, name)
    for name in subfolders
    if os.path.exists(os.path.join(folder, name, run_folder.METRICS))
  ]
  if not runs:
    raise ConfigError(f'--runs: {folder} holds no {run_folder.METRICS}, nor do its subfolders')
  return runs


def main(argv):
  try:
    if len(argv) > 1:
      raise ConfigError(f'unexpected argument {argv[1]!r}: flags are written --name=value')
    write_summary()
  except UserError as e:
    sys.exit(f'error: {e}')


def write_summary():
  """Reads the runs, writes the figures and summary.md, prints the table."""
  if not FLAGS.runs or not FLAGS.out:
    raise ConfigError('--runs and --out are required')
  if not 0 < FLAGS.target <= 1:
    raise ConfigError(f'--target must be an accuracy in (0, 1], got {FLAGS.target}')
  folders = [f for f in FLAGS.runs.split(',') if f]
  repeated = sorted({f for f in folders if folders.count(f) > 1})
  if repeated:
    raise ConfigError(f'--runs names {", ".join(repeated)} more than once')
  outputs.check_output_folder(FLAGS.out, 'out')
  groups, finals, staleness = {}, {}, []
  for folder in folders:
    curves, servers, seed_rows = [], set(), []
    for workdir in seed_workdirs(folder):
      rows = run_folder.read_metrics(workdir)
      seed_rows.append(rows)
      if not rows or FLAGS.metric not in rows[-1]:
        raise ConfigError(f'--metric: {workdir}/{run_folder.METRICS} has no {FLAGS.metric}')
      if any('virtual_time' not in r for r in rows):
        raise ConfigError(
          f'--runs: {workdir}/{run_folder.METRICS} has rows without virtual_time (a run of '
          'a version before the virtual clock)'
        )
      servers.add(str(run_folder.read_config_values(workdir).get('server', 'sync')))
      curves.append(
        results.Curve([r['virtual_time'] for r in rows], [r.get(FLAGS.metric) for r in rows])
      )
      for r in rows:
        staleness.extend(r.get('staleness', []))
    label = f'{os.path.basename(folder.rstrip("/"))} ({"/".join(sorted(servers))})'
    groups[label], finals[label] = curves, seed_rows
  unknown = [
    m
    for m in FLAGS.final_metrics
    if not any(
      results.final_value(rows, m) is not None
      for seed_rows in finals.values()
      for rows in seed_rows
    )
  ]
  if unknown:
    raise ConfigError(f'--final_metrics: no run logged {", ".join(unknown)}')
  budgets, table = results.virtual_time_table(groups, FLAGS.target)
  summary = results.virtual_time_markdown(budgets, table, FLAGS.target, FLAGS.metric)
  if FLAGS.final_metrics:
    summary += "\n\nAt the end of each run's update budget:\n\n" + results.final_values_markdown(
      finals, FLAGS.final_metrics
    )
  os.makedirs(FLAGS.out, exist_ok=True)
  plots.plot_accuracy_vs_virtual_time(
    groups, os.path.join(FLAGS.out, 'accuracy_vs_virtual_time.png'), FLAGS.metric
  )
  if staleness:
    plots.plot_staleness_histogram(staleness, os.path.join(FLAGS.out, 'staleness_histogram.png'))
  with open(os.path.join(FLAGS.out, 'summary.md'), 'w') as f:
    f.write(summary + '\n')
  print(summary)
