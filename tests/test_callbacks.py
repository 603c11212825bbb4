"""Tests of apfl_jax.runner.callbacks (no training: hand-made reports and rows)."""

import json
import types

import numpy as np
import pytest

from apfl_jax.core.errors import ConfigError, TrainingDivergedError
from apfl_jax.runner import callbacks


def report(finite=(True, True), clients=(3, 5), loss=(0.5, 1.5)):
  return types.SimpleNamespace(
    clients=np.array(clients), finite=np.array(finite), loss=np.array(loss), extra={}
  )


def test_divergence_names_the_round_and_the_first_bad_client():
  check = callbacks.DivergenceCheck()
  check.after_step(1, report())
  with pytest.raises(TrainingDivergedError, match='round 7, client 5'):
    check.after_step(7, report(finite=(True, False)))


def test_divergence_names_the_flags_that_scale_the_steps():
  check = callbacks.DivergenceCheck('--learning_rate or --fedgen_alpha')
  with pytest.raises(
    TrainingDivergedError, match=r'try a lower --learning_rate or --fedgen_alpha\)'
  ):
    check.after_step(2, report(finite=(False, True)))


def test_metrics_log_appends_evaluated_rows_only(tmp_path):
  rows = [{'round': 1}]
  log = callbacks.MetricsLog(str(tmp_path / 'metrics.jsonl'), rows)
  log.after_round(2, None, None, report())
  log.after_round(3, None, {'round': 3, 'personalized_acc': 0.5}, report())
  assert rows == [{'round': 1}, {'round': 3, 'personalized_acc': 0.5}]
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{'round': 3, 'personalized_acc': 0.5}]
  full = callbacks.MetricsLog('/dev/full', [])
  with pytest.raises(ConfigError, match='--workdir: cannot write /dev/full'):
    full.after_round(1, None, {'round': 1}, report())


class FakeManager:
  def __init__(self):
    self.saved = []

  def save(self, step, args):
    self.saved.append((step, args['state'].item, args['host'].item))


class FakeDriver:
  def split(self, tree):
    return tree['device'], {'round': tree['device'] // 10}


def test_checkpoint_every_k_rounds_and_after_the_last():
  manager, driver = FakeManager(), FakeDriver()
  ckpt = callbacks.Checkpoint(manager, driver, every=2, num_rounds=5)
  for r in range(1, 6):
    ckpt.after_round(r, {'device': r * 10}, None, report())
  assert manager.saved == [(2, 20, {'round': 2}), (4, 40, {'round': 4}), (5, 50, {'round': 5})]


def test_progress_line_has_loss_accuracy_and_eta():
  lines = []
  progress = callbacks.Progress(lambda text, flush: lines.append(text), num_rounds=10)
  progress.after_round(1, None, None, report())
  progress.after_round(2, None, {'personalized_acc': 0.25, 'global_acc': None}, report())
  assert lines[0].startswith('round 1/10 loss 1.0000 ') and 'ETA' in lines[0]
  assert 'personalized 0.2500' in lines[1] and 'global' not in lines[1]


def test_metrics_are_logged_before_the_checkpoint_is_saved(tmp_path):
  hooks = callbacks.default_callbacks(
    str(tmp_path), [], FakeManager(), FakeDriver(), types.SimpleNamespace(
      checkpoint_every=1, num_rounds=1, algorithm='fedgen'), print
  )  # fmt: skip
  kinds = [type(h) for h in hooks]
  assert kinds.index(callbacks.MetricsLog) < kinds.index(callbacks.Checkpoint)
  assert kinds[0] is callbacks.DivergenceCheck
  assert '--fedgen_alpha' in hooks[0].step_flags
  for hook in hooks:
    hook.close()
