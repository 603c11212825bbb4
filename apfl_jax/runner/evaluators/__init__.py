"""The evaluations of a run, one module each, all run by ONE jitted call (`Evaluator`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.core import sharding
from apfl_jax.runner.evaluators import (
  dropout_no_label_prior,
  global_model,
  personalized,
  unseen_class,
  unseen_class_control,
)
from apfl_jax.runner.evaluators.base import EvalInputs, Evaluation
from apfl_jax.runner.experiment import EVAL_CHUNK, Experiment

# The evaluations of every run, in the order of their metrics in metrics.jsonl. An added
# entry runs inside the same jitted call and writes its metrics beside the others.
EVALUATIONS: dict[str, Evaluation] = {
  'personalized': personalized.EVALUATION,
  'global': global_model.EVALUATION,
  'dropout_no_label_prior': dropout_no_label_prior.EVALUATION,
  'unseen_class': unseen_class.EVALUATION,
  'unseen_class_onehot_control': unseen_class_control.EVALUATION,
}


class Evaluator:
  """ONE jitted call runs every evaluation of `EVALUATIONS` on the algorithm's state."""

  def __init__(self, experiment: Experiment):
    self._exp = experiment
    union_test_index, test_count = sharding.to_host(
      (experiment.data.union_test_index, experiment.data.test_count)
    )
    unseen = np.flatnonzero(
      np.isin(experiment.dataset.test_labels[union_test_index], experiment.unseen_classes)
    )
    unseen = unseen[unseen < int(test_count.sum())]
    padded = -(-max(len(unseen), 1) // EVAL_CHUNK) * EVAL_CHUNK
    index = np.zeros((padded,), np.int32)
    index[: len(unseen)] = union_test_index[unseen]
    group = np.ones((padded,), np.int32)
    group[: len(unseen)] = 0
    self._inputs = EvalInputs(
      experiment,
      experiment.data,
      jnp.asarray(index),
      jnp.asarray(group),
      len(unseen),
      jnp.asarray(experiment.dropout_clients, jnp.int32),
    )
    self._evaluate = jax.jit(self._all_counts)

  def _all_counts(self, state, data, unseen_index, unseen_group, dropout_ids):
    inputs = dataclasses.replace(
      self._inputs,
      data=data,
      unseen_index=unseen_index,
      unseen_group=unseen_group,
      dropout_ids=dropout_ids,
    )
    counts: dict[str, Any] = {}
    for name, e in EVALUATIONS.items():
      counts[name] = e.counts(inputs, state, counts)
    return counts

  def __call__(self, state) -> dict[str, Any]:
    inputs = self._inputs
    # `to_host`: per-client counts may be split over the devices of several processes.
    counts = sharding.to_host(
      self._evaluate(
        state, inputs.data, inputs.unseen_index, inputs.unseen_group, inputs.dropout_ids
      )
    )
    metrics: dict[str, Any] = {}
    for name, e in EVALUATIONS.items():
      metrics.update(e.metrics(inputs, counts[name], metrics))
    return metrics
