"""Global accuracy: the global model on every client's test split."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from apfl_jax.runner.evaluators import base
from apfl_jax.runner.evaluators.base import EvalInputs


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array | None:
  algorithm = inputs.experiment.algorithm
  global_params = algorithm.global_params(state)
  if global_params is None:
    return None
  # A shared personalized model that is the global one (FedAvg): its counts, not a rerun.
  if algorithm.personalized_axis is None and global_params is algorithm.personalized_params(
    state, inputs.data
  ):
    return before['personalized']
  return base.pool_counts(inputs, global_params)


def metrics(inputs: EvalInputs, correct: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  count = np.asarray(exp.data.test_count)
  return {'global_acc': None if correct is None else float(correct.sum() / max(count.sum(), 1))}


EVALUATION = base.Evaluation(counts, metrics)
