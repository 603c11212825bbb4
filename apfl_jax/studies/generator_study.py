"""Generator study: fresh generators taught by a finished AP-FL run's final models.

AP-FL's friend models learn only what the generator's samples carry. This study restores a
finished AP-FL run and, once per generator setting (`GENERATOR_FLAGS`, e.g. the diversity
loss over same-label pairs), trains a fresh generator: the run's architecture, its
initialisation key and optimizer, labels drawn from the run's label memory, for as many
steps as the run's generator took in all (generator_steps x num_rounds). The teacher is the
final global model alone, as in the run. A setting `global_teacher_weight=g` with g < 1
gives each label's weight (1 - g) n_{k,y} / sum_j n_{j,y} to the clients' final local
models theta_k (every client that trained, weighted by its training label counts) and g to
the global model: the paper's weighted cross-entropy over client models, read with the
persistent local models as the client models. For each generator the study reports the
spread of its samples and the personalized accuracy of friends trained on them
(`beta_sweep.sweep`). A setting may also change friend flags (`beta_sweep.FRIEND_FLAGS`):
its friends then train with them, on its generator. The run's own generator comes first,
and the run's own setting retrained comes next. That second row shows how close the
retraining is to the run, where the teacher changed every round.

Spread, on the memorized classes, 32 samples each, in the classifier's input space
(standardised pixels or head inputs):
  within_class_l1: mean_d |x_i - x_j| over pairs i != j of one class (0: the class
    collapsed to one sample, whatever z is);
  between_class_l1: mean_d |m_c - m_e| over pairs of class means c != e;
  teacher_acc: the final global model's accuracy on the samples (whoever taught them).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.algorithms import apfl
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.core.errors import UserError
from apfl_jax.runner import checkpoints, run_folder
from apfl_jax.studies import beta_sweep

# Flags a generator setting may change, and the GeneratorSetup field each one sets.
GENERATOR_FLAGS = {
  'diversity_pairs': 'diversity_pairs',
  'generator_ce_weight': 'ce_weight',
  'global_teacher_weight': 'global_teacher_weight',
}
SAMPLES_PER_CLASS = 32


def parse_generator_settings(text: str) -> list[dict[str, str]]:
  """The --generator_settings list (`beta_sweep.parse_settings` of `GENERATOR_FLAGS` and
  `beta_sweep.FRIEND_FLAGS`)."""
  allowed = (*GENERATOR_FLAGS, *beta_sweep.FRIEND_FLAGS)
  return beta_sweep.parse_settings(text, allowed, 'generator_settings')


def spread(
  setup: knowledge_transfer.GeneratorSetup,
  model: Any,
  generator_params: Any,
  global_params: Any,
  classes: np.ndarray,
  rng: jax.Array,
) -> dict[str, float]:
  """within_class_l1, between_class_l1 and teacher_acc of one generator (module docstring).

  Args:
    setup: the generator setup.
    model: the classifier.
    generator_params: the generator's parameters.
    global_params: the teacher's parameters.
    classes: int [C] the classes to sample (C >= 2).
    rng: key.

  Returns:
    The three metrics.
  """
  per_class, num = SAMPLES_PER_CLASS, len(classes)
  labels = jnp.repeat(jnp.asarray(classes, jnp.int32), per_class)
  samples = generator_lib.generate(
    setup.generator, generator_params, rng, labels, setup.noise_dim, setup.noise_distribution
  )
  flat = samples.reshape(num, per_class, -1)
  pairs = jnp.mean(jnp.abs(flat[:, :, None] - flat[:, None, :]), axis=-1)
  within = jnp.sum(pairs) / (num * per_class * (per_class - 1))
  means = jnp.mean(flat, axis=1)
  between = jnp.sum(jnp.mean(jnp.abs(means[:, None] - means[None]), axis=-1)) / (num * (num - 1))
  logits = knowledge_transfer.sample_logits(model, setup.kind, global_params, samples)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return {
    'within_class_l1': float(within),
    'between_class_l1': float(between),
    'teacher_acc': float(accuracy),
  }


def retrain_generator(
  experiment: Any, state: Any, setup: knowledge_transfer.GeneratorSetup
) -> generator_lib.GeneratorState:
  """A fresh generator of `setup` taught by the run's final models (module docstring)."""
  config = experiment.config
  algorithm = experiment.algorithm
  _, generator_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))
  long_setup = dataclasses.replace(setup, steps=setup.steps * config.num_rounds)
  initial = generator_lib.init_generator(setup.generator, setup.optimizer, generator_rng)

  if setup.global_teacher_weight < 1:
    teachers = algorithm.local_models(state)
    label_counts = jnp.asarray(algorithm.label_counts) * state.clients.has_local[:, None]
  else:
    teachers, label_counts = None, None

  @jax.jit
  def train(initial, teachers, label_counts, global_params, seen_counts):
    trained, _ = knowledge_transfer.train_on_teachers(
      long_setup,
      algorithm.model,
      initial,
      teachers,
      label_counts,
      global_params,
      seen_counts,
      jax.random.key(config.seed + 2),
    )
    return trained

  return train(initial, teachers, label_counts, state.server.params, state.server.seen_counts)


def evaluate_run(
  workdir: str, betas: list[float], settings: Sequence[dict[str, str]]
) -> dict[str, dict[str, Any]]:
  """Spread and personalized accuracies of a finished AP-FL run's generator and of fresh ones.

  Args:
    workdir: a finished AP-FL run whose global model is its generator's only teacher.
    betas: interpolation weights of the local model.
    settings: generator-flag changes (`parse_generator_settings`) to retrain with, besides
      the run's own.

  Returns:
    'run' (the run's generator), 'retrained' (the run's setting retrained), then
    `beta_sweep.setting_name` of each change -> {'spread': `spread`, 'betas': beta ->
    `beta_sweep.METRICS`}.

  Raises:
    UserError: not an AP-FL run, a client-taught generator, or a bad setting.
  """
  config = run_folder.read_config(workdir)
  if config.algorithm != 'apfl':
    raise UserError(f'--runs: {workdir} is a {config.algorithm} run, not apfl')
  changed = [beta_sweep.changed_config(config, c, 'generator_settings') for c in settings]
  experiment, state, _ = checkpoints.restore_latest(workdir)
  algorithm = experiment.algorithm
  assert isinstance(algorithm, apfl.APFL)
  if algorithm.setup.global_teacher_weight < 1:
    raise UserError(
      f'--runs: {workdir} has --global_teacher_weight={algorithm.setup.global_teacher_weight}; '
      "its generator learned from each round's client updates, which the study cannot "
      'rebuild (it needs 1)'
    )
  classes = np.flatnonzero(np.asarray(state.server.seen_counts) > 0)
  if len(classes) < 2:
    raise UserError(f'--runs: {workdir} has memorized fewer than 2 classes')
  probe_key = jax.random.key(config.seed + 3)

  def score(generator, scoring=experiment):
    scored = state.replace(server=state.server.replace(generator=generator))
    return {
      'spread': spread(
        algorithm.setup,
        algorithm.model,
        generator.params,
        state.server.params,
        classes,
        probe_key,
      ),
      'betas': beta_sweep.sweep(scoring, scored, betas),
    }

  results = {'run': score(state.server.generator)}
  results['retrained'] = score(retrain_generator(experiment, state, algorithm.setup))
  for changes, setting in zip(settings, changed):
    fields = {GENERATOR_FLAGS[n]: getattr(setting, n) for n in changes if n in GENERATOR_FLAGS}
    setup = dataclasses.replace(algorithm.setup, **fields)
    friend_changed = any(name not in GENERATOR_FLAGS for name in changes)
    scoring = beta_sweep.with_friend_config(experiment, setting) if friend_changed else experiment
    generator = retrain_generator(experiment, state, setup)
    results[beta_sweep.setting_name(changes)] = score(generator, scoring)
  return results


def table(runs: str, per_run: list[dict[str, dict[str, Any]]], betas: list[float]) -> str:
  """Markdown: one row per generator, mean ± population std over the runs."""
  spreads = ('within_class_l1', 'between_class_l1', 'teacher_acc')
  heads = ['generator', *spreads] + [f'personalized β={b:g}' for b in betas]
  lines = [
    f'Seeds: {len(per_run)} runs in `{runs}`; "run": the run\'s own generator; "retrained": '
    "the run's setting, trained afresh on the final global model for generator_steps x "
    'num_rounds steps (as every other row).',
    '',
    '| ' + ' | '.join(heads) + ' |',
    '|' + '---|' * len(heads),
  ]

  def cell(values):
    return f'{np.mean(values):.4f} ± {np.std(values):.4f}'

  for name in per_run[0]:
    cells = [name]
    cells += [cell([r[name]['spread'][m] for r in per_run]) for m in spreads]
    cells += [cell([r[name]['betas'][b]['personalized_acc'] for r in per_run]) for b in betas]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
