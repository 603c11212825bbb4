"""Tests of apfl_jax.studies.beta_sweep: one friend training, then any beta (tiny AP-FL run)."""

import json
import os
import subprocess
import sys

from conftest import make_synthetic_dataset
import numpy as np
import pytest
from test_train import APFL_TINY, tiny_config

from apfl_jax.core import evaluation
from apfl_jax.core.errors import UserError
from apfl_jax.data import datasets
from apfl_jax.runner import checkpoints, run_folder, train
from apfl_jax.runner import experiment as experiment_lib
from apfl_jax.studies import beta_sweep

# End-to-end runs of the study on tiny federations: CI runs them, `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def dropout_run(tmp_path_factory):
  """(workdir, final metrics row) of a 2-round AP-FL run whose monopoly client drops out."""
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)
    config = tiny_config(
      **APFL_TINY,
      partition='monopoly',
      classes_per_client=2,
      monopoly_clients=1,
      monopoly_classes_per_client=1,
      dropout_clients='monopoly',
      dropout_round=0,
      num_rounds=2,
      apfl_beta=0.3,
    )
    workdir = str(tmp_path_factory.mktemp('apfl'))
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      final = [json.loads(line) for line in f][-1]
    yield workdir, final


def test_the_runs_own_beta_gives_its_logged_metrics(dropout_run):
  workdir, final = dropout_run
  swept = beta_sweep.evaluate_run(workdir, [0.3])['run'][0.3]
  assert set(swept) == set(beta_sweep.METRICS)
  for metric, value in swept.items():
    assert value == pytest.approx(final[metric], abs=1e-9), metric


def test_beta_one_scores_the_local_models(dropout_run):
  workdir, _ = dropout_run
  experiment, state, _ = checkpoints.restore_latest(workdir)
  local = experiment.algorithm.local_models(state)
  correct = evaluation.client_correct_counts(
    experiment.model, local, experiment.data, experiment_lib.EVAL_CHUNK
  )
  expected = evaluation.accuracy_summary(
    np.asarray(correct), np.asarray(experiment.data.test_count), experiment.groups, 'p'
  )
  swept = beta_sweep.sweep(experiment, state, [1.0, 0.0])
  assert swept[1.0]['personalized_acc'] == pytest.approx(expected['p_acc'])
  assert swept[1.0]['dropout_personalized_acc'] == pytest.approx(expected['dropout_p_acc'])
  # A dropout client never trained: at beta=1 its model is the global one, label prior or not.
  assert swept[1.0]['dropout_personalized_acc_no_label_prior'] == pytest.approx(
    expected['dropout_p_acc']
  )
  assert 0.0 <= swept[0.0]['personalized_acc'] <= 1.0


def test_bad_betas_are_refused_naming_the_flag():
  with pytest.raises(UserError, match='--betas'):
    beta_sweep.parse_betas('0.1,x')
  with pytest.raises(UserError, match='--betas'):
    beta_sweep.parse_betas('0.1,1.5')
  assert beta_sweep.parse_betas('0,0.5,1') == [0.0, 0.5, 1.0]


def test_table_leaves_out_metrics_the_setting_does_not_report():
  per_run = [{'run': {0.1: {'personalized_acc': 0.5}}}, {'run': {0.1: {'personalized_acc': 0.7}}}]
  text = beta_sweep.table('runs', per_run, [0.1])
  assert '| beta | personalized_acc |' in text
  assert '| 0.1 | 0.6000 ± 0.1000 |' in text
  assert 'dropout' not in text


def test_table_has_a_setting_column_only_for_several_settings():
  per_run = [
    {
      'run': {1.0: {'personalized_acc': 0.5}},
      'apfl_friend_labels=all': {1.0: {'personalized_acc': 0.7}},
    }
  ]
  text = beta_sweep.table('runs', per_run, [1.0])
  assert '| friend setting | beta | personalized_acc |' in text
  assert '| run | 1 | 0.5000 ± 0.0000 |' in text
  assert '| apfl_friend_labels=all | 1 | 0.7000 ± 0.0000 |' in text


def test_friend_settings_retrain_the_friends_and_leave_the_local_models(dropout_run):
  workdir, _ = dropout_run
  own_batch = run_folder.read_config(workdir).apfl_friend_batch_size
  settings = beta_sweep.parse_friend_settings(
    f'apfl_friend_batch_size={own_batch}; apfl_friend_labels=all,apfl_friend_learning_rate=0.9'
  )
  swept = beta_sweep.evaluate_run(workdir, [1.0, 0.0], settings)
  assert list(swept) == [
    'run',
    f'apfl_friend_batch_size={own_batch}',
    'apfl_friend_labels=all,apfl_friend_learning_rate=0.9',
  ]
  # The run's own value is the run: the same friends, bit for bit.
  assert swept[f'apfl_friend_batch_size={own_batch}'] == swept['run']
  changed = swept['apfl_friend_labels=all,apfl_friend_learning_rate=0.9']
  # beta=1 reads only the local models; beta=0 only the (other) friends.
  assert changed[1.0] == swept['run'][1.0]
  assert changed[0.0] != swept['run'][0.0]


@pytest.mark.parametrize(
  'text, message',
  [
    ('apfl_beta=0.5', 'FLAG one of'),
    ('apfl_friend_labels', 'FLAG one of'),
    ('apfl_synthetic_per_class=x', "apfl_synthetic_per_class='x' is not of type int"),
    ('apfl_friend_labels=bogus', 'apfl_friend_labels'),
  ],
)
def test_bad_friend_settings_are_refused_naming_the_flag(dropout_run, text, message):
  workdir, _ = dropout_run
  with pytest.raises(UserError, match='--friend_settings') as raised:
    beta_sweep.evaluate_run(workdir, [0.1], beta_sweep.parse_friend_settings(text))
  assert message in str(raised.value)


def test_command_line_names_the_flag_of_a_missing_runs_folder(tmp_path):
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments', 'beta_sweep.py')
  result = subprocess.run(
    [sys.executable, script, f'--runs={tmp_path / "none"}', f'--out={tmp_path / "t.md"}'],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
    f'error: --runs: no seed*/ folders in {tmp_path / "none"}'
  ]


def test_seed_workdirs_picks_the_named_seeds(tmp_path):
  for seed in (0, 1, 2):
    (tmp_path / f'seed{seed}').mkdir()
  runs = str(tmp_path)
  assert beta_sweep.seed_workdirs(runs, '') == [f'{runs}/seed{s}' for s in (0, 1, 2)]
  assert beta_sweep.seed_workdirs(runs, '2,0') == [f'{runs}/seed2', f'{runs}/seed0']
  with pytest.raises(UserError, match=f'--seeds: no workdir {runs}/seed5'):
    beta_sweep.seed_workdirs(runs, '0,5')
  with pytest.raises(UserError, match="--seeds: expected comma-separated integers, got 'a'"):
    beta_sweep.seed_workdirs(runs, 'a')
