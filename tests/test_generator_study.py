"""Tests of apfl_jax.studies.generator_study: fresh generators on a finished tiny AP-FL run."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from conftest import make_synthetic_dataset
import jax
import numpy as np
import pytest
from test_train import APFL_TINY, tiny_config

from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.core.errors import UserError
from apfl_jax.data import datasets
from apfl_jax.runner import checkpoints, run_folder, train
from apfl_jax.studies import generator_study

# End-to-end runs of the study on tiny federations: CI runs them, `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def apfl_run(tmp_path_factory):
  """The workdir of a finished 2-round AP-FL run (global model as the generator's teacher)."""
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)
    workdir = str(tmp_path_factory.mktemp('apfl'))
    train.train_and_evaluate(tiny_config(**APFL_TINY, num_rounds=2), workdir)
    yield workdir


def test_rows_are_the_run_its_setting_retrained_and_each_setting(apfl_run, monkeypatch):
  friend_rates = []
  sweep = generator_study.beta_sweep.sweep

  def recording_sweep(experiment, state, betas):
    friend_rates.append(experiment.algorithm.friend.learning_rate)
    return sweep(experiment, state, betas)

  monkeypatch.setattr(generator_study.beta_sweep, 'sweep', recording_sweep)
  name = 'diversity_pairs=same_label,apfl_friend_learning_rate=0.125'
  settings = generator_study.parse_generator_settings(name)
  studied = generator_study.evaluate_run(apfl_run, [1.0, 0.0], settings)
  assert list(studied) == ['run', 'retrained', name]
  for row in studied.values():
    assert row['spread']['within_class_l1'] > 0
    assert row['spread']['between_class_l1'] > 0
    assert 0.0 <= row['spread']['teacher_acc'] <= 1.0
    # beta=1 reads only the local models, which no generator or friend touches.
    assert row['betas'][1.0] == studied['run']['betas'][1.0]
  # Another diversity loss trains another generator from the same start and keys ...
  assert studied[name]['spread'] != studied['retrained']['spread']
  # ... and the setting's friend flag trains its friends (the run's own before it).
  run_rate = run_folder.read_config(apfl_run).validate().apfl_friend_learning_rate
  assert run_rate != 0.125 and friend_rates == [run_rate, run_rate, 0.125]
  text = generator_study.table('runs', [studied, studied], [1.0, 0.0])
  assert f'| {name} |' in text
  assert text.count('\n| ') == 4  # header and 3 generators


def test_spread_is_zero_within_a_class_whose_samples_ignore_the_noise(apfl_run):
  experiment, state, _ = checkpoints.restore_latest(apfl_run)
  algorithm = experiment.algorithm
  params = jax.tree.map(np.array, state.server.generator.params)  # writable copies
  first = params['Dense_0']['kernel']
  first[: algorithm.setup.noise_dim] = 0.0  # z's rows of the first layer
  classes = np.arange(algorithm.num_classes)
  spread = generator_study.spread(
    algorithm.setup, algorithm.model, params, state.server.params, classes, jax.random.key(0)
  )
  assert spread['within_class_l1'] == pytest.approx(0.0, abs=1e-6)
  assert spread['between_class_l1'] > 1e-3


def test_client_models_teach_with_the_weights_of_their_label_counts(apfl_run):
  experiment, state, _ = checkpoints.restore_latest(apfl_run)
  algorithm = experiment.algorithm
  setup = algorithm.setup
  client_taught = dataclasses.replace(setup, global_teacher_weight=0.0)
  labels = np.arange(algorithm.num_classes).repeat(4)

  def samples(generator):
    # Samples, not parameters: a bias before BatchNorm gets a zero gradient, which Adam
    # turns into full-size steps on float noise.
    return generator_lib.generate(
      setup.generator,
      generator.params,
      jax.random.key(0),
      labels,
      setup.noise_dim,
      setup.noise_distribution,
    )

  own = samples(generator_study.retrain_generator(experiment, state, setup))
  by_clients = samples(generator_study.retrain_generator(experiment, state, client_taught))
  # The clients' local models are not the global model, so they teach another generator.
  assert not np.allclose(by_clients, own, atol=1e-3)
  # Local models equal to the global model: each label's client weights sum to 1, so the
  # clients together teach exactly what the global model alone teaches.
  as_global = state.replace(
    clients=state.clients.replace(
      local_params=jax.tree.map(
        lambda loc, g: np.broadcast_to(g, loc.shape),
        state.clients.local_params,
        state.server.params,
      )
    )
  )
  same = samples(generator_study.retrain_generator(experiment, as_global, client_taught))
  np.testing.assert_allclose(same, own, atol=2e-3)


def test_bad_settings_and_client_taught_runs_are_refused(apfl_run, tmp_path):
  with pytest.raises(UserError, match='--generator_settings: expected FLAG=VALUE'):
    generator_study.parse_generator_settings('apfl_beta=0.5')
  with pytest.raises(UserError, match='--generator_settings: .*diversity_pairs'):
    generator_study.evaluate_run(
      apfl_run, [0.1], generator_study.parse_generator_settings('diversity_pairs=bogus')
    )
  client_taught = str(tmp_path / 'client_taught')
  shutil.copytree(apfl_run, client_taught)
  with open(os.path.join(client_taught, 'config.json')) as f:
    config = json.load(f)
  config['global_teacher_weight'] = 0.5
  with open(os.path.join(client_taught, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(UserError, match='--global_teacher_weight=0.5'):
    generator_study.evaluate_run(client_taught, [0.1], [])


def test_command_line_names_the_flag_of_a_missing_seed(tmp_path):
  script = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), 'experiments', 'generator_study.py'
  )
  result = subprocess.run(
    [sys.executable, script, f'--runs={tmp_path}', '--seeds=3', f'--out={tmp_path / "t.md"}'],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [f'error: --seeds: no workdir {tmp_path}/seed3']
