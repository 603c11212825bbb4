"""Zero-shot probe: the model scored on the classes no active client holds.

The probe (`Algorithm.unseen_class_params`; AP-FL: the global model whose friend training
covered every class uniformly) is scored per class on the whole union test pool, so that
beside its recall on the unseen classes (`unseen_class_acc`) it also reports its accuracy
on the classes the active clients hold (`unseen_class_seen_acc`) and the balanced
accuracy, the mean recall over every class of the pool (`unseen_class_balanced_acc`): a
probe that buys unseen recall by over-predicting the unseen labels loses it on the seen
classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.core import evaluation
from apfl_jax.runner.evaluators import base
from apfl_jax.runner.evaluators.base import EvalInputs
from apfl_jax.runner.experiment import EVAL_CHUNK


def class_counts(inputs: EvalInputs, params: Any) -> dict[str, jax.Array]:
  """{'correct', 'total'}: int32 [num_classes] per class of the union test pool."""
  data = inputs.data
  num_classes = inputs.experiment.dataset.num_classes
  labels = data.test_labels[data.union_test_index]
  group = jnp.where(data.union_test_client < data.num_clients, labels, num_classes)
  return {
    'correct': evaluation.correct_by_group(
      inputs.experiment.model,
      params,
      data,
      data.union_test_index,
      group,
      num_classes,
      EVAL_CHUNK,
    ),
    'total': jnp.zeros((num_classes,), jnp.int32).at[group].add(1, mode='drop'),
  }


def class_metrics(inputs: EvalInputs, counts: Any, suffix: str = '') -> dict[str, Any]:
  """unseen_class_acc, unseen_class_seen_acc and unseen_class_balanced_acc (+ suffix).

  Args:
    inputs: the evaluation inputs.
    counts: `class_counts` on the host, or None (no probe: every metric None).
    suffix: appended to every name, e.g. '_onehot_control'.
  """
  names = [f'unseen_class{part}_acc{suffix}' for part in ('', '_seen', '_balanced')]
  if counts is None:
    return dict.fromkeys(names)
  correct = np.asarray(counts['correct'], np.float64)
  total = np.asarray(counts['total'], np.float64)
  unseen = np.zeros(correct.shape, bool)
  unseen[np.asarray(inputs.experiment.unseen_classes, np.int64)] = True
  seen = ~unseen & (total > 0)
  present = total > 0
  ratio = lambda mask: float(correct[mask].sum() / total[mask].sum()) if total[mask].sum() else None
  balanced = float(np.mean(correct[present] / total[present])) if present.any() else None
  return dict(zip(names, (ratio(unseen), ratio(seen), balanced)))


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> Any:
  del before
  unseen_params = inputs.experiment.algorithm.unseen_class_params(state, inputs.data)
  if unseen_params is None or not inputs.num_unseen:
    return None
  return class_counts(inputs, unseen_params)


def metrics(inputs: EvalInputs, counts: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  if not len(inputs.experiment.unseen_classes):
    return {}
  return class_metrics(inputs, counts)


EVALUATION = base.Evaluation(counts, metrics)
