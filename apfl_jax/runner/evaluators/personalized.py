"""Personalized accuracy: each client's personalized model on its own test split."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from apfl_jax.core import evaluation
from apfl_jax.runner.evaluators import base
from apfl_jax.runner.evaluators.base import EvalInputs
from apfl_jax.runner.experiment import EVAL_CHUNK


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array:
  del before
  algorithm = inputs.experiment.algorithm
  params = algorithm.personalized_params(state, inputs.data)
  if algorithm.personalized_axis is None:
    return base.pool_counts(inputs, params)
  return evaluation.client_correct_counts(
    inputs.experiment.model, params, inputs.data, EVAL_CHUNK, client_map=algorithm.client_map
  )


def metrics(inputs: EvalInputs, correct: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  count = np.asarray(exp.data.test_count)
  return {
    **evaluation.accuracy_summary(correct, count, exp.groups, 'personalized'),
    'client_personalized_acc': [
      round(float(c / n), 6) if n else None for c, n in zip(correct, count)
    ],
  }


EVALUATION = base.Evaluation(counts, metrics)
