"""Result tables of a comparison of methods over seeds (`experiments/compare.py`) and of
sync/async runs against virtual time (`experiments/plot_async.py`).

`Run` is one (method, seed) run as collected from its folder, `Curve` one run's accuracy
against virtual time; every function here is a pure function of them. Statistics over
seeds are the mean and the population standard deviation (ddof=0, so one seed gives std 0)
of the runs that finished; a metric no finished run reports is 'n/a'. The figures are in `plots`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from apfl_jax.core.errors import ConfigError

# Accuracy metrics of metrics.jsonl / summary.json that the table reports, in order.
METRICS = (
  'personalized_acc',
  'global_acc',
  'active_personalized_acc',
  'dropout_personalized_acc',
  'dropout_personalized_acc_no_label_prior',
  'unseen_class_acc',
  'unseen_class_seen_acc',
  'unseen_class_balanced_acc',
  'unseen_class_acc_onehot_control',
  'unseen_class_seen_acc_onehot_control',
  'unseen_class_balanced_acc_onehot_control',
)
METRIC_NAMES = {
  'personalized_acc': 'personalized',
  'personalized_acc_weighted': 'personalized (sample-weighted)',
  'global_acc': 'global',
  'active_personalized_acc': 'active clients',
  'dropout_personalized_acc': 'dropout clients',
  'dropout_personalized_acc_no_label_prior': 'dropout clients, no label prior',
  'unseen_class_acc': 'unseen classes',
  'unseen_class_seen_acc': 'probe on seen classes',
  'unseen_class_balanced_acc': 'probe balanced',
  'unseen_class_acc_onehot_control': 'unseen classes, one-hot control',
  'unseen_class_seen_acc_onehot_control': 'one-hot control on seen classes',
  'unseen_class_balanced_acc_onehot_control': 'one-hot control balanced',
}
STAGES = ('final', 'best')
NA = 'n/a'


@dataclasses.dataclass(frozen=True)
class Run:
  """One (method, seed) run of a comparison.

  Attributes:
    algorithm: the --algorithm of the run.
    setting: the swept flag and value ('beta=0.01'), '' without a sweep.
    seed: the --seed of the run.
    workdir: the run's folder.
    summary: `run_folder.summarize` of the run (final_X, best_X); empty if it failed.
    metrics: the rows of its metrics.jsonl in round order; empty if it failed.
    error: the one-line message of a failed run; '' if it finished.
    dropout_clients: clients that drop out (marked in the per-client plot).
  """

  algorithm: str
  setting: str
  seed: int
  workdir: str
  summary: dict[str, Any]
  metrics: list[dict[str, Any]]
  error: str = ''
  dropout_clients: tuple[int, ...] = ()

  @property
  def label(self) -> str:
    """The method's row label: 'apfl' or 'apfl beta=0.01'."""
    return f'{self.algorithm} {self.setting}'.strip()

  @property
  def failed(self) -> bool:
    return bool(self.error)


def group_by_label(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Runs per method label, labels in first-seen order."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.label, []).append(run)
  return groups


def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
  """(mean, population std) of the values that are not None or NaN; None if none are."""
  kept = [float(v) for v in values if v is not None and not math.isnan(v)]
  if not kept:
    return None
  return float(np.mean(kept)), float(np.std(kept))


def method_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One row per method: its seeds, failures and `mean_std` of every stage and metric.

  Args:
    runs: the comparison's runs, failed ones included.

  Returns:
    Dicts with 'method', 'algorithm', 'setting', 'seeds' (finished seeds), 'failed'
    ([(seed, message)]) and '<stage>_<metric>' -> (mean, std) or None for every stage
    in STAGES and metric in METRICS.
  """
  table = []
  for label, group in group_by_label(runs).items():
    finished = [r for r in group if not r.failed]
    row: dict[str, Any] = {
      'method': label,
      'algorithm': group[0].algorithm,
      'setting': group[0].setting,
      'seeds': [r.seed for r in finished],
      'failed': [(r.seed, r.error) for r in group if r.failed],
    }
    for stage in STAGES:
      for metric in METRICS:
        key = f'{stage}_{metric}'
        row[key] = mean_std([r.summary.get(key) for r in finished])
    table.append(row)
  return table


def format_stat(stat: tuple[float, float] | None) -> str:
  """'0.8123 ± 0.0100', or 'n/a' for None."""
  return NA if stat is None else f'{stat[0]:.4f} ± {stat[1]:.4f}'


def _failure_note(row: dict[str, Any]) -> str:
  return '; '.join(f'seed {seed} failed: {message}' for seed, message in row['failed'])


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
  """The `method_table` as a Markdown table.

  Metrics other than personalized_acc that are n/a for every method get no columns; a
  method whose runs failed shows each failure's seed and message in the 'notes' column.
  """
  metrics = [
    m
    for m in METRICS
    if m == 'personalized_acc' or any(row[f'{s}_{m}'] is not None for row in table for s in STAGES)
  ]
  header = (
    ['method', 'seeds'] + [f'{METRIC_NAMES[m]} ({s})' for m in metrics for s in STAGES] + ['notes']
  )
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in table:
    seeds = ','.join(str(s) for s in row['seeds']) or 'none'
    cells = (
      [row['method'], seeds]
      + [format_stat(row[f'{s}_{m}']) for m in metrics for s in STAGES]
      + [_failure_note(row)]
    )
    lines.append('| ' + ' | '.join(c.replace('|', '/') for c in cells) + ' |')
  return '\n'.join(lines)


def csv_columns() -> list[str]:
  """Columns of results.csv (the same for every comparison)."""
  stats = [f'{s}_{m}_{part}' for m in METRICS for s in STAGES for part in ('mean', 'std')]
  return ['method', 'algorithm', 'setting', 'seeds', 'num_failed'] + stats + ['errors']


def write_csv(table: Sequence[dict[str, Any]], path: str) -> None:
  """Writes the `method_table`; a missing statistic is 'n/a', seeds are ';'-joined."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=csv_columns())
    writer.writeheader()
    for row in table:
      out = {
        'method': row['method'],
        'algorithm': row['algorithm'],
        'setting': row['setting'],
        'seeds': ';'.join(str(s) for s in row['seeds']),
        'num_failed': len(row['failed']),
        'errors': _failure_note(row),
      }
      for metric in METRICS:
        for stage in STAGES:
          stat = row[f'{stage}_{metric}']
          out[f'{stage}_{metric}_mean'] = NA if stat is None else f'{stat[0]:.6f}'
          out[f'{stage}_{metric}_std'] = NA if stat is None else f'{stat[1]:.6f}'
      writer.writerow(out)


def read_csv(path: str) -> list[dict[str, Any]]:
  """The `method_table` a results.csv holds (the inverse of `write_csv`).

  Columns of metrics added after the file was written read as n/a (None).

  Raises:
    ConfigError: naming the file when it cannot be read or lacks a column every version
      wrote.
  """
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise ConfigError(f'{path}: cannot read it ({e.strerror or e})') from None
  table = []
  for number, row in enumerate(rows, 2):
    try:
      out: dict[str, Any] = {
        'method': row['method'],
        'algorithm': row['algorithm'],
        'setting': row['setting'],
        'seeds': [int(s) for s in row['seeds'].split(';') if s],
        'failed': [
          (int(seed), message)
          for seed, message in re.findall(
            r'seed (\d+) failed: (.*?)(?=; seed \d+ failed: |$)', row['errors']
          )
        ],
      }
    except (KeyError, ValueError) as e:
      raise ConfigError(f'{path}: line {number} is not a results.csv row ({e})') from None
    for metric in METRICS:
      for stage in STAGES:
        mean = row.get(f'{stage}_{metric}_mean', NA)
        std = row.get(f'{stage}_{metric}_std', NA)
        out[f'{stage}_{metric}'] = None if NA in (mean, std) else (float(mean), float(std))
    table.append(out)
  return table


def write_markdown(
  table: Sequence[dict[str, Any]],
  header: Sequence[str],
  figures: Sequence[tuple[str, str]],
  path: str,
) -> None:
  """Writes results.md: header lines, the table, then the figures.

  Args:
    table: the `method_table`.
    header: Markdown lines that come first (title, command, machine, ...).
    figures: (caption, file name relative to `path`'s folder) of each figure.
    path: the file to write.
  """
  lines = [*header, '', markdown_table(table), '']
  for caption, name in figures:
    lines += [f'![{caption}]({name})', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


@dataclasses.dataclass(frozen=True)
class Curve:
  """One run's evaluated accuracy against virtual time (`experiments/plot_async.py`).

  Attributes:
    times: virtual time of each evaluation, increasing.
    values: the accuracy at each of them (None where it was not evaluated).
  """

  times: list[float]
  values: list[float | None]


def virtual_time_to_target(
  times: Sequence[float], accuracies: Sequence[float | None], target: float
) -> float | None:
  """The first virtual time at which accuracy reaches `target` (None if never)."""
  for t, a in zip(times, accuracies):
    if a is not None and a >= target:
      return float(t)
  return None


def virtual_time_table(
  groups: dict[str, list[Curve]], target: float
) -> tuple[list[float], list[dict[str, Any]]]:
  """Per group of seed runs: final virtual time, accuracy at a common time, time to target.

  The i-th curve of every group is the same seed (the same client speeds). Its budget is
  the shortest final virtual time of that seed's runs, so each run is scored at a time it
  reached and against its own seed's clock. A run's accuracy at the budget is its last
  evaluation at or before it; a run with none is left out of that mean.

  Args:
    groups: label -> the curves of its seeds, in the same seed order for every label.
    target: the accuracy whose first virtual time is reported.

  Returns:
    (budget of each seed, rows): each row has 'run', 'seeds' (number of curves),
    'final_time', 'at_budget' and 'time_to_target' as `mean_std` (the last over the seeds
    that reached the target) and 'reached' (how many did).

  Raises:
    ConfigError: the groups hold different numbers of seed runs.
  """
  sizes = {len(curves) for curves in groups.values()}
  if len(sizes) != 1:
    found = ', '.join(f'{label}: {len(curves)}' for label, curves in groups.items())
    raise ConfigError(f'--runs: every folder needs the same seeds; seed runs found: {found}')
  budgets = [
    min(seed_curves[i].times[-1] for seed_curves in groups.values()) for i in range(sizes.pop())
  ]
  rows = []
  for label, curves in groups.items():
    at_budget = []
    for curve, budget in zip(curves, budgets):
      before = [v for t, v in zip(curve.times, curve.values) if t <= budget and v is not None]
      at_budget.append(before[-1] if before else None)
    reached = [virtual_time_to_target(c.times, c.values, target) for c in curves]
    rows.append(
      {
        'run': label,
        'seeds': len(curves),
        'final_time': mean_std([c.times[-1] for c in curves]),
        'at_budget': mean_std(at_budget),
        'time_to_target': mean_std(reached),
        'reached': sum(r is not None for r in reached),
      }
    )
  return budgets, rows


def virtual_time_markdown(
  budgets: Sequence[float], rows: Sequence[dict[str, Any]], target: float, metric: str
) -> str:
  """The `virtual_time_table` as Markdown (mean ± std over seeds, population std), then
  the budget of each seed."""

  def stat(value: tuple[float, float] | None) -> str:
    return NA if value is None else f'{value[0]:.0f} ± {value[1]:.0f}'

  lines = [
    f'| run | seeds | final virtual time | {metric} at the budget | '
    f'time to {target:g} | seeds reaching {target:g} |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["run"]} | {row["seeds"]} | {stat(row["final_time"])} | '
      f'{format_stat(row["at_budget"])} | {stat(row["time_to_target"])} | '
      f'{row["reached"]}/{row["seeds"]} |'
    )
  lines += [
    '',
    'Budget: the shortest final virtual time among the runs of the same seed; per seed: '
    + ', '.join(f'{b:.0f}' for b in budgets)
    + '. Population std over seeds.',
  ]
  return '\n'.join(lines)


def final_value(rows: Sequence[Mapping[str, Any]], metric: str) -> float | None:
  """The metric's last logged value in a run's metrics rows (None if never logged)."""
  logged = [r[metric] for r in rows if r.get(metric) is not None]
  return float(logged[-1]) if logged else None


def final_values_markdown(
  finals: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], metrics: Sequence[str]
) -> str:
  """Mean ± std over seeds (population std) of each metric's last logged value, one row
  per group of seed runs; a column per metric, n/a where no seed logged it.

  Args:
    finals: label -> the metrics rows of each of its seed runs.
    metrics: the columns, metrics.jsonl names.
  """
  names = [METRIC_NAMES.get(m, m) for m in metrics]
  lines = ['| run | ' + ' | '.join(names) + ' |', '|---' * (len(metrics) + 1) + '|']
  for label, seed_rows in finals.items():
    cells = [format_stat(mean_std([final_value(rows, m) for rows in seed_rows])) for m in metrics]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def gain_by_client_size(
  client_accs: Mapping[str, Sequence[np.ndarray]],
  train_sizes: Sequence[np.ndarray],
  reference: str,
) -> list[dict[str, Any]]:
  """Per-client accuracy gain of each method over `reference`, split at the median size.

  Clients of every seed are pooled; "small" are those with fewer training examples than
  the median of the pool, "large" the others.

  Args:
    client_accs: method -> one [num_clients] accuracy array per seed (same seeds, same
      order for every method, `reference` included).
    train_sizes: one [num_clients] training-set size array per seed.
    reference: the method the gains are measured against.

  Returns:
    One row per method other than `reference`: {'method', 'small', 'large', 'all',
    'clients'}, the mean gains (accuracy points as fractions) and the pooled client count.
  """
  sizes = np.concatenate([np.asarray(s, np.float64) for s in train_sizes])
  small = sizes < np.median(sizes)
  base = np.concatenate([np.asarray(a, np.float64) for a in client_accs[reference]])
  rows = []
  for method, accs in client_accs.items():
    if method == reference:
      continue
    gain = np.concatenate([np.asarray(a, np.float64) for a in accs]) - base
    rows.append(
      {
        'method': method,
        'small': float(gain[small].mean()),
        'large': float(gain[~small].mean()),
        'all': float(gain.mean()),
        'clients': int(gain.size),
      }
    )
  return rows
