"""Tables and figures of a comparison of methods over seeds (`experiments/compare.py`).

Every function here is a pure function of the collected `Run`s (or of arrays it is
given) and writes one file; nothing trains or reads checkpoints. Statistics over seeds
are the mean and the population standard deviation (ddof=0, so one seed gives std 0) of
the runs that finished; a metric no finished run reports is 'n/a'.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from typing import Any, Sequence

import matplotlib
from matplotlib import ticker
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# Accuracy metrics of metrics.jsonl / summary.json that the table reports, in order.
METRICS = ('personalized_acc', 'global_acc', 'active_personalized_acc',
           'dropout_personalized_acc', 'dropout_personalized_acc_no_label_prior',
           'unseen_class_acc')
METRIC_NAMES = {'personalized_acc': 'personalized',
                'personalized_acc_weighted': 'personalized (sample-weighted)',
                'global_acc': 'global',
                'active_personalized_acc': 'active clients',
                'dropout_personalized_acc': 'dropout clients',
                'dropout_personalized_acc_no_label_prior': 'dropout clients, no label prior',
                'unseen_class_acc': 'unseen classes'}
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
    summary: `train.summarize` of the run (final_X, best_X); empty if it failed.
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
    row = {'method': label, 'algorithm': group[0].algorithm, 'setting': group[0].setting,
           'seeds': [r.seed for r in finished],
           'failed': [(r.seed, r.error) for r in group if r.failed]}
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
  metrics = [m for m in METRICS if m == 'personalized_acc' or
             any(row[f'{s}_{m}'] is not None for row in table for s in STAGES)]
  header = ['method', 'seeds'] + [f'{METRIC_NAMES[m]} ({s})' for m in metrics
                                  for s in STAGES] + ['notes']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in table:
    seeds = ','.join(str(s) for s in row['seeds']) or 'none'
    cells = [row['method'], seeds] + [format_stat(row[f'{s}_{m}']) for m in metrics
                                      for s in STAGES] + [_failure_note(row)]
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
      out = {'method': row['method'], 'algorithm': row['algorithm'],
             'setting': row['setting'], 'seeds': ';'.join(str(s) for s in row['seeds']),
             'num_failed': len(row['failed']), 'errors': _failure_note(row)}
      for metric in METRICS:
        for stage in STAGES:
          stat = row[f'{stage}_{metric}']
          out[f'{stage}_{metric}_mean'] = NA if stat is None else f'{stat[0]:.6f}'
          out[f'{stage}_{metric}_std'] = NA if stat is None else f'{stat[1]:.6f}'
      writer.writerow(out)


def write_markdown(table: Sequence[dict[str, Any]], header: Sequence[str],
                   figures: Sequence[tuple[str, str]], path: str) -> None:
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


def plot_accuracy_vs_round(runs: Sequence[Run], path: str,
                           metric: str = 'personalized_acc',
                           references: dict[str, float] | None = None) -> bool:
  """Mean `metric` over seeds vs round per method, with the min-max band over seeds.

  Only the rounds every finished seed of a method evaluated are drawn.

  Args:
    runs: the runs.
    path: the PNG to write.
    metric: the metrics.jsonl key to draw.
    references: method label -> a reference accuracy (e.g. a published one), drawn as a
      dashed line in the method's colour.

  Returns:
    False (and writes nothing) when no finished run reports the metric.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for label, group in group_by_label(runs).items():
    series = [{row['round']: row[metric] for row in r.metrics
               if row.get(metric) is not None} for r in group if not r.failed]
    series = [s for s in series if s]
    if not series:
      continue
    rounds = sorted(set.intersection(*(set(s) for s in series)))
    values = np.asarray([[s[k] for k in rounds] for s in series], np.float64)
    line, = ax.plot(rounds, values.mean(0), marker='o', markersize=3,
                    label=f'{label} (n={len(series)})')
    ax.fill_between(rounds, values.min(0), values.max(0), color=line.get_color(),
                    alpha=0.2, linewidth=0)
    if references and label in references:
      ax.axhline(references[label], color=line.get_color(), linestyle='--', linewidth=1)
    drawn = True
  if drawn:
    ax.set_xlabel('round')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f'{METRIC_NAMES.get(metric, metric)} accuracy')
    ax.set_title('mean over seeds, band: min-max over seeds'
                 + ('; dashed: reference' if references else ''))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def plot_per_client_accuracy(runs: Sequence[Run], path: str) -> bool:
  """Final personalized accuracy of every client, one bar group per client.

  Bars are the mean over seeds, dots the seeds; dropout clients are marked '*' in red.
  A client's data depend on the seed (the partition is drawn per seed), but the roles
  (e.g. the monopoly clients, which are the last ids) do not.

  Returns:
    False (and writes nothing) when no finished run has 'client_personalized_acc'.
  """
  per_method = {}
  dropout: set[int] = set()
  for label, group in group_by_label(runs).items():
    finals = [r.metrics[-1]['client_personalized_acc'] for r in group
              if not r.failed and 'client_personalized_acc' in r.metrics[-1]]
    if finals:
      per_method[label] = np.asarray(
          [[np.nan if v is None else v for v in f] for f in finals], np.float64)
      dropout.update(c for r in group for c in r.dropout_clients)
  if not per_method:
    return False
  num_clients = max(v.shape[1] for v in per_method.values())
  width = 0.8 / len(per_method)
  fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * num_clients * len(per_method)), 4.5))
  clients = np.arange(num_clients)
  for i, (label, values) in enumerate(per_method.items()):
    x = clients[:values.shape[1]] + (i - (len(per_method) - 1) / 2) * width
    seen = ~np.isnan(values)  # NaN: a client without test examples
    mean = np.where(seen.any(0), np.nansum(values, 0) / np.maximum(seen.sum(0), 1), np.nan)
    ax.bar(x, mean, width, label=f'{label} (n={len(values)})')
    ax.plot(np.broadcast_to(x, values.shape).ravel(), values.ravel(), '.', markersize=3,
            color='black', alpha=0.6)
  ax.set_xticks(clients)
  ax.set_xticklabels([f'{c}*' if c in dropout else str(c) for c in clients])
  for tick, c in zip(ax.get_xticklabels(), clients):
    if c in dropout:
      tick.set_color('red')
  ax.set_xlabel('client (* = dropout client)' if dropout else 'client')
  ax.set_ylabel('final personalized accuracy')
  ax.set_ylim(0, 1.05)
  ax.set_title('bars: mean over seeds, dots: seeds')
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_generated_samples(pixels: np.ndarray, class_names: Sequence[str],
                           unseen_classes: Sequence[int], title: str, path: str) -> None:
  """A grid of generated images: one row per class, unseen classes in red.

  Args:
    pixels: float [num_classes, samples, H, W, C] in [0, 1].
    class_names: name of each class.
    unseen_classes: classes no active client holds (marked 'unseen').
    title: the figure title (e.g. the run it comes from).
    path: the PNG to write.
  """
  num_classes, samples = pixels.shape[:2]
  unseen = {int(c) for c in unseen_classes}
  fig, axes = plt.subplots(num_classes, samples, squeeze=False,
                           figsize=(0.9 * samples + 1.6, 0.9 * num_classes + 0.6))
  for c in range(num_classes):
    for j in range(samples):
      ax = axes[c, j]
      image = pixels[c, j]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0.0,
                vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if c in unseen:
        for spine in ax.spines.values():
          spine.set_edgecolor('red')
          spine.set_linewidth(2)
    name = f'{class_names[c]} (unseen)' if c in unseen else class_names[c]
    axes[c, 0].set_ylabel(name, rotation=0, ha='right', va='center', fontsize=8,
                          color='red' if c in unseen else 'black')
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def virtual_time_to_target(times: Sequence[float], accuracies: Sequence[float],
                           target: float) -> float | None:
  """The first virtual time at which accuracy reaches `target` (None if never)."""
  for t, a in zip(times, accuracies):
    if a is not None and a >= target:
      return float(t)
  return None


def plot_accuracy_vs_virtual_time(series: dict[str, tuple[Sequence[float], Sequence[float]]],
                                  path: str, metric: str = 'personalized_acc') -> None:
  """One line per run: accuracy against virtual time.

  Args:
    series: label -> (virtual times, accuracies).
    path: PNG to write.
    metric: y-axis label.
  """
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, (times, accuracies) in series.items():
    ax.plot(times, accuracies, marker='.', label=label)
  ax.set_xlabel('virtual time')
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_staleness_histogram(staleness: Sequence[int], path: str) -> None:
  """Histogram of the staleness of the applied updates."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  values = np.asarray(staleness, np.int64)
  ax.hist(values, bins=np.arange(values.max(initial=0) + 2) - 0.5, rwidth=0.85)
  ax.set_xlabel('staleness tau (server versions)')
  ax.set_ylabel('updates')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
