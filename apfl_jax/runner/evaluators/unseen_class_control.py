"""The zero-shot probe's control: the same probe procedure with one-hot class codes.

An algorithm with a control (`Algorithm.unseen_class_control_params`; AP-FL with
`--apfl_unseen_control`: a second generator conditioned on one-hot codes instead of A(c),
trained beside the first on the same teachers) is scored like the probe
(`unseen_class`): `unseen_class_acc_onehot_control`, `unseen_class_seen_acc_onehot_control`
and `unseen_class_balanced_acc_onehot_control`. A one-hot code carries no semantic
information, so for a class no client ever held the control's generator is untrained;
the gap between `unseen_class_acc` and its control is what A(c) carries.
"""

from __future__ import annotations

from typing import Any

from apfl_jax.runner.evaluators import base, unseen_class
from apfl_jax.runner.evaluators.base import EvalInputs

SUFFIX = '_onehot_control'


def counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> Any:
  del before
  params = inputs.experiment.algorithm.unseen_class_control_params(state, inputs.data)
  if params is None or not inputs.num_unseen:
    return None
  return unseen_class.class_counts(inputs, params)


def metrics(inputs: EvalInputs, counts: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  if counts is None:
    return {}
  return unseen_class.class_metrics(inputs, counts, SUFFIX)


EVALUATION = base.Evaluation(counts, metrics)
