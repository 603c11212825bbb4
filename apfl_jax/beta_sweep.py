"""AP-FL interpolation sweep: finished AP-FL runs scored at several beta values.

beta only enters personalization (theta_p = beta * theta_local + (1 - beta) * theta_friend);
local training, aggregation, generator training and friend training never read it. So the
sweep restores a run's final checkpoint, trains every client's friend model once (as the
run's own evaluation does), and scores the interpolation for each beta in one more
compiled call with beta as an argument. At the run's own beta this is exactly the
personalized accuracy of the run's final metrics.jsonl row. `experiments/beta_sweep.py`
is its command line.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax import evaluation, run_folder, train
from apfl_jax.algorithms import apfl
from apfl_jax.errors import UserError

METRICS = (
  'personalized_acc',
  'active_personalized_acc',
  'dropout_personalized_acc',
  'dropout_personalized_acc_no_label_prior',
)


def parse_betas(text: str) -> list[float]:
  """The --betas list; UserError naming the flag on a bad entry."""
  try:
    betas = [float(b) for b in text.split(',')]
  except ValueError:
    raise UserError(f'--betas: expected comma-separated numbers, got {text!r}') from None
  if not all(0.0 <= b <= 1.0 for b in betas):
    raise UserError(f'--betas: every value must be in [0, 1], got {text!r}')
  return betas


def sweep(experiment: train.Experiment, state: Any, betas: list[float]) -> dict[float, dict]:
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
      apfl.interpolate(*parts, beta),
      data,
      train.EVAL_CHUNK,
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


def evaluate_run(workdir: str, betas: list[float]) -> dict[float, dict[str, float]]:
  """Final-checkpoint metrics of one AP-FL workdir for each beta."""
  algorithm = run_folder.read_config(workdir).algorithm
  if algorithm != 'apfl':
    raise UserError(f'--runs: {workdir} is a {algorithm} run, not apfl')
  experiment, state, _ = run_folder.restore_latest(workdir)
  return sweep(experiment, state, betas)


def table(runs: str, per_run: list[dict[float, dict]], betas: list[float]) -> str:
  """The markdown table: mean ± population std over the runs, one row per beta."""
  # Columns the setting reports (no dropout columns without dropout clients).
  metrics = [m for m in METRICS if any(m in r[b] for r in per_run for b in betas)]
  lines = [
    f'Seeds: {len(per_run)} runs in `{runs}`; final-round accuracy, '
    'mean ± std (population) over seeds.',
    '',
    '| beta | ' + ' | '.join(metrics) + ' |',
    '|---|' + '---|' * len(metrics),
  ]
  for beta in betas:
    cells = []
    for metric in metrics:
      values = [r[beta][metric] for r in per_run if r[beta].get(metric) is not None]
      cells.append(f'{np.mean(values):.4f} ± {np.std(values):.4f}' if values else 'n/a')
    lines.append(f'| {beta:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
