"""A run's folder (its --workdir): what `train.train_and_evaluate` writes and scripts read.

  <workdir>/config.json        the run's Config (`read_config`)
  <workdir>/metrics.jsonl      one JSON object per evaluated round (`read_metrics`)
  <workdir>/summary.json       final and best values of every accuracy (`summarize`)
  <workdir>/checkpoints/<k>/   see `checkpoints`
  <workdir>/partition.json, partition.txt, tensorboard/, run.lock

Every reader names the file in a one-line `ConfigError` when it is missing or unreadable.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import numpy as np

from apfl_jax.config.config import Config
from apfl_jax.core.errors import ConfigError

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'


# Flags every version of the project wrote into config.json: a file without one of them
# was not written by a run (or was damaged), and resuming from it could resume a run as
# another algorithm.
ALWAYS_WRITTEN = (
  'algorithm',
  'dataset',
  'model',
  'partition',
  'num_clients',
  'num_rounds',
  'batch_size',
  'learning_rate',
)


def read_config_values(workdir: str, resumed: bool = False) -> dict[str, Any]:
  """config.json as written (a run of an older version may lack flags added since).

  Args:
    workdir: the run's folder.
    resumed: the caller resumes the run: the file must hold every flag of
      `ALWAYS_WRITTEN` (never resume a run as another algorithm).

  Raises:
    ConfigError: naming the file when it cannot be read, is not JSON or not a JSON object,
      or (`resumed`) lacks a flag every version wrote.
  """
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path, 'rb') as f:
      values = json.loads(f.read().decode('utf-8'))
  except OSError as e:
    raise ConfigError(f'{path}: cannot read it ({e.strerror or e})') from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    problem = 'empty' if isinstance(e, json.JSONDecodeError) and not e.doc.strip() else 'not JSON'
    raise ConfigError(
      f'{path}: {problem} ({str(e).splitlines()[0][:80]}); move it aside or pass another --workdir'
    ) from None
  if not isinstance(values, dict):
    raise ConfigError(
      f'{path}: holds a JSON {type(values).__name__}, not the object of flags a run writes; '
      'move it aside or pass another --workdir'
    )
  missing = [key for key in ALWAYS_WRITTEN if key not in values]
  if resumed and missing:
    raise ConfigError(
      f'{path}: lacks {", ".join(missing)}, which every run writes; it is damaged or not a '
      "run's config: move it aside or pass another --workdir"
    )
  return values


def read_config(workdir: str) -> Config:
  """The run's `Config` (flags added since the run take their defaults)."""
  from apfl_jax.config.config import Config  # config imports every component

  return Config.from_dict(read_config_values(workdir))


def read_metrics(workdir: str, up_to_round: int | None = None) -> list[dict[str, Any]]:
  """The rows of metrics.jsonl (up to `up_to_round`); [] when there is none yet.

  A torn last line (a kill while it was written: text that starts a JSON object but does
  not end it) is dropped with a one-line warning.

  Raises:
    ConfigError: naming the file and the line when a line is not a JSON object with an
      integer `round` (binary garbage, a bare number, a row without `round`).
  """
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return []
  try:
    with open(path, 'rb') as f:
      lines = [line for line in f.read().split(b'\n') if line.strip()]
  except OSError as e:
    raise ConfigError(f'{path}: cannot read it ({e.strerror or e})') from None
  rows = []
  for number, raw in enumerate(lines, 1):
    try:
      text = raw.decode('utf-8')
      row = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
      if number == len(lines) and raw.lstrip().startswith(b'{') and _is_text(raw):
        logging.warning(
          'dropping the torn last line of %s (a run was killed while writing it)', path
        )
        continue
      raise ConfigError(
        f'--workdir: line {number} of {path} is not JSON; fix or delete that line'
      ) from None
    if not isinstance(row, dict) or type(row.get('round')) is not int:
      raise ConfigError(
        f'--workdir: line {number} of {path} is not a metrics row (a JSON object with an '
        'integer "round"); fix or delete that line'
      )
    rows.append(row)
  if up_to_round is None:
    return rows
  return [r for r in rows if r['round'] <= up_to_round]


def _is_text(raw: bytes) -> bool:
  """Whether `raw` is UTF-8 text (a torn line may end inside a multi-byte character)."""
  try:
    raw.decode('utf-8')
  except UnicodeDecodeError as e:
    return e.start >= len(raw) - 3 and e.reason == 'unexpected end of data'
  return True


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Final and best-over-rounds values of every accuracy metric in `rows`."""
  summary: dict[str, Any] = {}
  if not rows:
    return summary
  for key in rows[-1]:
    # Accuracies: *_acc, *_acc_weighted and *_acc_no_label_prior (not the per-client lists).
    if isinstance(rows[-1][key], list) or '_acc' not in key:
      continue
    values = [(r[key], r['round']) for r in rows if r.get(key) is not None and not np.isnan(r[key])]
    summary[f'final_{key}'] = rows[-1][key]
    if values:
      best, best_round = max(values)
      summary[f'best_{key}'] = best
      summary[f'best_{key}_round'] = best_round
  return summary


def format_summary(summary: dict[str, Any], workdir: str) -> str:
  """A small table of final and best accuracies."""
  lines = [f'results in {workdir}', f'{"metric":<34} {"final":>8} {"best":>8} {"round":>6}']
  for key in summary:
    if not key.startswith('final_'):
      continue
    name = key[len('final_') :]
    final = summary[key]
    best = summary.get(f'best_{name}')
    fmt = lambda v: (
      '     n/a' if v is None or (isinstance(v, float) and np.isnan(v)) else f'{v:8.4f}'
    )
    lines.append(f'{name:<34} {fmt(final)} {fmt(best)} {summary.get(f"best_{name}_round", ""):>6}')
  return '\n'.join(lines)
