"""Dropout clients' personalized accuracy without knowledge of their own label sets."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from apfl_jax.core import evaluation
from apfl_jax.runner.evaluators import base
from apfl_jax.runner.evaluators.base import EvalInputs
from apfl_jax.runner.experiment import EVAL_CHUNK


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array | None:
  del before
  if not inputs.dropout_ids.shape[0]:
    return None
  algorithm = inputs.experiment.algorithm
  prior_free = algorithm.label_prior_free_params(state, inputs.data, inputs.dropout_ids)
  if prior_free is None:
    return None
  return evaluation.client_correct_counts(
    inputs.experiment.model, prior_free, inputs.data, EVAL_CHUNK, client_ids=inputs.dropout_ids
  )


def metrics(inputs: EvalInputs, correct: Any, before: dict[str, Any]) -> dict[str, Any]:
  exp = inputs.experiment
  if not exp.dropout_clients:
    return {}
  # Without knowledge of the dropout clients' own label sets: equal to
  # dropout_personalized_acc for algorithms whose personalization never uses it.
  if correct is None:
    accuracy = before['dropout_personalized_acc']
  else:
    count = np.asarray(exp.data.test_count)[np.asarray(exp.dropout_clients)]
    accuracy = evaluation.accuracy_summary(correct, count, {}, 'x')['x_acc']
  return {'dropout_personalized_acc_no_label_prior': accuracy}


EVALUATION = base.Evaluation(counts, metrics)
