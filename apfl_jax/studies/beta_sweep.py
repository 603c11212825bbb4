"""AP-FL interpolation sweep: finished AP-FL runs scored at several beta values.

beta only enters personalization (theta_p = beta * theta_local + (1 - beta) * theta_friend);
local training, aggregation, generator training and friend training never read it. So the
sweep restores a run's final checkpoint, trains every client's friend model once (as the
run's own evaluation does), and scores the interpolation for each beta in one more
compiled call with beta as an argument. At the run's own beta this is exactly the
personalized accuracy of the run's final metrics.jsonl row. `experiments/beta_sweep.py`
is its command line.

Friend models, too, only enter evaluation: no round of training reads them. So other friend
settings (`FRIEND_FLAGS`, e.g. another friend learning rate) can be scored on the same
finished run, and the result equals a run trained with those settings.
"""

from collections.abc import Sequence
import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax import algorithms
from apfl_jax.algorithms import apfl
from apfl_jax.core import evaluation
from apfl_jax.core.errors import ConfigError, UserError
from apfl_jax.runner import checkpoints, run_folder
from apfl_jax.runner import experiment as experiment_lib
from apfl_jax.runner.experiment import Experiment

METRICS = (
  'personalized_acc',
  'active_personalized_acc',
  'dropout_personalized_acc',
  'dropout_personalized_acc_no_label_prior',
)


# Flags of AP-FL's friend models: `--friend_settings` may change these and nothing else.
FRIEND_FLAGS = (
  'apfl_friend_learning_rate',
  'apfl_friend_labels',
  'apfl_friend_init',
  'apfl_synthetic_per_class',
  'apfl_synthetic_budget',
  'apfl_friend_batch_size',
)


def parse_betas(text: str) -> list[float]:
  """The --betas list; UserError naming the flag on a bad entry."""
  try:
    betas = [float(b) for b in text.split(',')]
  except ValueError:
    raise UserError(f'--betas: expected comma-separated numbers, got {text!r}') from None
  if not all(0.0 <= b <= 1.0 for b in betas):
    raise UserError(f'--betas: every value must be in [0, 1], got {text!r}')
  if len(set(betas)) < len(betas):
    raise UserError(f'--betas: a value appears more than once in {text!r}')
  return betas


def parse_settings(text: str, allowed: Sequence[str], option: str) -> list[dict[str, str]]:
  """A settings list: ';'-separated settings of comma-separated FLAG=VALUE pairs.

  Args:
    text: the flag's value.
    allowed: the flags a setting may change.
    option: the command-line flag, named in errors.

  Raises:
    UserError: naming `option`, for a pair that is not FLAG=VALUE with FLAG in `allowed`.
  """
  settings = []
  for group in text.split(';'):
    if not group.strip():
      continue
    changes = {}
    for pair in group.split(','):
      name, sep, value = (part.strip() for part in pair.partition('='))
      if not sep or name not in allowed:
        raise UserError(
          f'--{option}: expected FLAG=VALUE with FLAG one of {", ".join(allowed)}; '
          f'got {pair.strip()!r}'
        )
      changes[name] = value
    settings.append(changes)
  return settings


def parse_friend_settings(text: str) -> list[dict[str, str]]:
  """The --friend_settings list (`parse_settings` of `FRIEND_FLAGS`)."""
  return parse_settings(text, FRIEND_FLAGS, 'friend_settings')


def seed_workdirs(runs: str, seeds: str) -> list[str]:
  """The seed<k>/ workdirs of `runs` named by `seeds` ('0,2'; '': every seed*/ folder).

  Raises:
    UserError: naming --seeds (or --runs) for a bad list or a missing folder.
  """
  if not seeds:
    workdirs = sorted(glob.glob(os.path.join(runs, 'seed*')))
    if not workdirs:
      raise UserError(f'--runs: no seed*/ folders in {runs}')
    return workdirs
  try:
    numbers = [int(s) for s in seeds.split(',')]
  except ValueError:
    raise UserError(f'--seeds: expected comma-separated integers, got {seeds!r}') from None
  if len(set(numbers)) < len(numbers):
    raise UserError(f'--seeds: a seed appears more than once in {seeds!r}')
  workdirs = [os.path.join(runs, f'seed{s}') for s in numbers]
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    raise UserError(f'--seeds: no workdir {missing[0]}')
  return workdirs


def changed_config(config: Any, changes: dict[str, str], option: str) -> Any:
  """The run's config with some flags changed (values parsed by the flag's type), validated.

  Raises:
    UserError: naming --`option` and the flag, for a value of the wrong type or an invalid
      one.
  """
  typed = {}
  for name, value in changes.items():
    kind = type(getattr(config, name))
    try:
      typed[name] = kind(value)
    except ValueError:
      raise UserError(f'--{option}: {name}={value!r} is not of type {kind.__name__}') from None
  try:
    return config.replace(**typed).validate()
  except ConfigError as e:
    raise UserError(f'--{option}: {e}') from None


def with_friend_config(experiment: Experiment, config: Any) -> Experiment:
  """The experiment with its algorithm rebuilt for `config` (other friend flags only).

  The data, partition, model and schedule do not depend on friend flags, so they are kept
  (no second data load or device copy).
  """
  algorithm = algorithms.create_algorithm(
    config, experiment.model, experiment.dataset, experiment.partition, experiment.schedule
  ).with_client_map(experiment.algorithm.client_map)
  return dataclasses.replace(experiment, config=config, algorithm=algorithm)


def setting_name(changes: dict[str, str]) -> str:
  """A table label of one friend setting; the run's own is 'run'."""
  return ','.join(f'{k}={v}' for k, v in changes.items()) or 'run'


def sweep(experiment: Experiment, state: Any, betas: list[float]) -> dict[float, dict]:
  """Personalized accuracies of one AP-FL state for each beta.

  Args:
    experiment: the run's experiment (its algorithm must be AP-FL).
    state: the algorithm state to personalize.
    betas: interpolation weights of the local model.

  Returns:
    beta -> the `METRICS` the run's evaluation reports (those that apply).
  """
  algorithm, model = experiment.algorithm, experiment.model
  if not isinstance(algorithm, apfl.APFL):
    raise UserError(f'beta sweep needs an AP-FL run, got {type(algorithm).__name__}')
  everyone = jnp.arange(algorithm.num_clients)
  dropout = jnp.asarray(experiment.dropout_clients, jnp.int32)

  @jax.jit
  def models(state):
    own = algorithm.personalization_parts(state, everyone, algorithm.client_label_probs())
    if not dropout.shape[0]:
      return own, None
    uniform = jnp.ones((dropout.shape[0], algorithm.num_classes), jnp.float32)
    return own, algorithm.personalization_parts(state, dropout, uniform)

  @jax.jit
  def correct(parts, beta, data, client_ids):
    return evaluation.client_correct_counts(
      model,
      apfl.interpolate(parts[0], parts[1], beta),
      data,
      experiment_lib.EVAL_CHUNK,
      client_ids=client_ids,
      client_map=algorithm.client_map,
    )

  own, prior_free = models(state)
  data = experiment.data
  count = np.asarray(data.test_count)
  results = {}
  for beta in betas:
    beta_arg = jnp.asarray(beta, jnp.float32)
    metrics = evaluation.accuracy_summary(
      np.asarray(correct(own, beta_arg, data, None)), count, experiment.groups, 'personalized'
    )
    if prior_free is not None:
      hits = np.asarray(correct(prior_free, beta_arg, data, dropout))
      metrics['dropout_personalized_acc_no_label_prior'] = evaluation.accuracy_summary(
        hits, count[np.asarray(dropout)], {}, 'x'
      )['x_acc']
    results[beta] = {k: metrics[k] for k in METRICS if k in metrics}
  return results


def evaluate_run(
  workdir: str, betas: list[float], friend_settings: Sequence[dict[str, str]] = ()
) -> dict[str, dict[float, dict[str, float]]]:
  """Final-checkpoint metrics of one AP-FL workdir for each friend setting and beta.

  Args:
    workdir: a finished AP-FL run's folder.
    betas: interpolation weights of the local model.
    friend_settings: friend-flag changes (`parse_friend_settings`) to score besides the
      run's own setting.

  Returns:
    setting name ('run' first, then `setting_name` of each change) -> beta -> metrics.
  """
  config = run_folder.read_config(workdir)
  if config.algorithm != 'apfl':
    raise UserError(f'--runs: {workdir} is a {config.algorithm} run, not apfl')
  configs = [changed_config(config, changes, 'friend_settings') for changes in friend_settings]
  experiment, state, _ = checkpoints.restore_latest(workdir)
  results = {'run': sweep(experiment, state, betas)}
  for changes, changed in zip(friend_settings, configs):
    results[setting_name(changes)] = sweep(with_friend_config(experiment, changed), state, betas)
  return results


def table(runs: str, per_run: list[dict[str, dict[float, dict]]], betas: list[float]) -> str:
  """The markdown table: mean ± population std over the runs, one row per setting and beta.

  The setting column is there only when friend settings other than the run's own were scored.
  """
  settings = list(per_run[0])
  # Columns the setting reports (no dropout columns without dropout clients).
  metrics = [
    m for m in METRICS if any(m in r[s][b] for r in per_run for s in settings for b in betas)
  ]
  keys = ['friend setting', 'beta'] if len(settings) > 1 else ['beta']
  lines = [
    f'Seeds: {len(per_run)} runs in `{runs}`; final-round accuracy, '
    'mean ± std (population) over seeds.',
    '',
    '| ' + ' | '.join(keys + metrics) + ' |',
    '|' + '---|' * (len(keys) + len(metrics)),
  ]
  for setting in settings:
    for beta in betas:
      cells = [setting, f'{beta:g}'] if len(settings) > 1 else [f'{beta:g}']
      for metric in metrics:
        values = [
          r[setting][beta][metric] for r in per_run if r[setting][beta].get(metric) is not None
        ]
        cells.append(f'{np.mean(values):.4f} ± {np.std(values):.4f}' if values else 'n/a')
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
