"""Figures of a comparison of methods over seeds (`experiments/compare.py`) and of async runs.

Every function here is a pure function of the collected `results.Run`s (or of arrays it
is given) and writes one file; nothing trains or reads checkpoints. The tables are in
`results`.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib
from matplotlib import ticker
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from apfl_jax.studies.results import METRIC_NAMES, Curve, Run, group_by_label  # noqa: E402


def plot_accuracy_vs_round(
  runs: Sequence[Run],
  path: str,
  metric: str = 'personalized_acc',
  references: dict[str, float] | None = None,
) -> bool:
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
    series = [
      {row['round']: row[metric] for row in r.metrics if row.get(metric) is not None}
      for r in group
      if not r.failed
    ]
    series = [s for s in series if s]
    if not series:
      continue
    rounds = sorted(set.intersection(*(set(s) for s in series)))
    values = np.asarray([[s[k] for k in rounds] for s in series], np.float64)
    (line,) = ax.plot(
      rounds, values.mean(0), marker='o', markersize=3, label=f'{label} (n={len(series)})'
    )
    ax.fill_between(
      rounds, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0
    )
    if references and label in references:
      ax.axhline(references[label], color=line.get_color(), linestyle='--', linewidth=1)
    drawn = True
  if drawn:
    ax.set_xlabel('round')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f'{METRIC_NAMES.get(metric, metric)} accuracy')
    ax.set_title(
      'mean over seeds, band: min-max over seeds' + ('; dashed: reference' if references else '')
    )
    ax.grid(alpha=0.3)
    # Outside the axes: with many methods an inside legend hides the curves.
    ax.legend(loc='center left', bbox_to_anchor=(1.02, 0.5), fontsize='small')
    fig.savefig(path, dpi=120, bbox_inches='tight')
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
    finals = [
      r.metrics[-1]['client_personalized_acc']
      for r in group
      if not r.failed and 'client_personalized_acc' in r.metrics[-1]
    ]
    if finals:
      per_method[label] = np.asarray(
        [[np.nan if v is None else v for v in f] for f in finals], np.float64
      )
      dropout.update(c for r in group for c in r.dropout_clients)
  if not per_method:
    return False
  num_clients = max(v.shape[1] for v in per_method.values())
  width = 0.8 / len(per_method)
  fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * num_clients * len(per_method)), 4.5))
  clients = np.arange(num_clients)
  for i, (label, values) in enumerate(per_method.items()):
    x = clients[: values.shape[1]] + (i - (len(per_method) - 1) / 2) * width
    seen = ~np.isnan(values)  # NaN: a client without test examples
    mean = np.where(seen.any(0), np.nansum(values, 0) / np.maximum(seen.sum(0), 1), np.nan)
    ax.bar(x, mean, width, label=f'{label} (n={len(values)})')
    ax.plot(
      np.broadcast_to(x, values.shape).ravel(),
      values.ravel(),
      '.',
      markersize=3,
      color='black',
      alpha=0.6,
    )
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


def plot_generated_samples(
  pixels: np.ndarray,
  class_names: Sequence[str],
  unseen_classes: Sequence[int],
  title: str,
  path: str,
) -> None:
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
  fig, axes = plt.subplots(
    num_classes, samples, squeeze=False, figsize=(0.9 * samples + 1.6, 0.9 * num_classes + 0.6)
  )
  for c in range(num_classes):
    for j in range(samples):
      ax = axes[c, j]
      image = pixels[c, j]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if c in unseen:
        for spine in ax.spines.values():
          spine.set_edgecolor('red')
          spine.set_linewidth(2)
    name = f'{class_names[c]} (unseen)' if c in unseen else class_names[c]
    axes[c, 0].set_ylabel(
      name, rotation=0, ha='right', va='center', fontsize=8, color='red' if c in unseen else 'black'
    )
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_accuracy_vs_virtual_time(
  groups: dict[str, list[Curve]],
  path: str,
  metric: str = 'personalized_acc',
) -> None:
  """Accuracy against virtual time: one colour per group, one line per seed run.

  Args:
    groups: label -> the curves of its seeds.
    path: PNG to write.
    metric: y-axis label.
  """
  fig, ax = plt.subplots(figsize=(7, 4))
  for color, (label, curves) in enumerate(groups.items()):
    for i, curve in enumerate(curves):
      ax.plot(
        curve.times,
        np.array([np.nan if v is None else v for v in curve.values], np.float64),
        marker='.',
        color=f'C{color}',
        alpha=1.0 if len(curves) == 1 else 0.6,
        label=label if i == 0 else None,
      )
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
  ax.hist(values, bins=list(np.arange(values.max(initial=0) + 2) - 0.5), rwidth=0.85)
  ax.set_xlabel('staleness tau (server versions)')
  ax.set_ylabel('updates')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
