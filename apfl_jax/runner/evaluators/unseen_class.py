"""Zero-shot probe: the model scored on the classes no active client holds."""

from __future__ import annotations

from typing import Any

import jax

from apfl_jax.core import evaluation
from apfl_jax.runner.evaluators import base
from apfl_jax.runner.evaluators.base import EvalInputs
from apfl_jax.runner.experiment import EVAL_CHUNK


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array | None:
  del before
  unseen_params = inputs.experiment.algorithm.unseen_class_params(state, inputs.data)
  if unseen_params is None or not inputs.num_unseen:
    return None
  return evaluation.correct_by_group(
    inputs.experiment.model,
    unseen_params,
    inputs.data,
    inputs.unseen_index,
    inputs.unseen_group,
    1,
    EVAL_CHUNK,
  )


def metrics(inputs: EvalInputs, correct: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  if not len(exp.unseen_classes):
    return {}
  return {'unseen_class_acc': None if correct is None else float(correct[0] / inputs.num_unseen)}


EVALUATION = base.Evaluation(counts, metrics)
