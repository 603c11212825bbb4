"""Tests of apfl_jax.runner.evaluators: the zero-shot probe's class metrics and control."""

import types

import numpy as np
import pytest

from apfl_jax.runner.evaluators import unseen_class


def test_probe_metrics_are_unseen_recall_seen_accuracy_and_balanced_accuracy():
  """Float64 from the definitions: classes 2 and 3 unseen, class 4 absent from the pool."""
  correct = np.array([5, 0, 3, 1, 0])
  total = np.array([10, 4, 6, 2, 0])
  inputs = types.SimpleNamespace(experiment=types.SimpleNamespace(unseen_classes=np.array([2, 3])))
  metrics = unseen_class.class_metrics(inputs, {'correct': correct, 'total': total}, '_x')
  assert metrics == pytest.approx(
    {
      'unseen_class_acc_x': (3 + 1) / (6 + 2),
      'unseen_class_seen_acc_x': (5 + 0) / (10 + 4),
      'unseen_class_balanced_acc_x': np.mean([5 / 10, 0 / 4, 3 / 6, 1 / 2]),
    }
  )
  assert unseen_class.class_metrics(inputs, None) == dict.fromkeys(
    ['unseen_class_acc', 'unseen_class_seen_acc', 'unseen_class_balanced_acc']
  )
