"""Tests of apfl_jax.runner.run_folder: reading a run's config, metrics and newest state."""

import json
import os

from conftest import make_synthetic_dataset
import numpy as np
import orbax.checkpoint as ocp
import pytest

from apfl_jax.config.config import Config
from apfl_jax.core.errors import ConfigError
from apfl_jax.data import datasets
from apfl_jax.runner import checkpoints, evaluators, run_folder, train


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  monkeypatch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)
  config = Config(
    dataset='mnist',
    num_clients=3,
    partition='iid',
    num_rounds=3,
    batch_size=8,
    local_epochs=0,
    local_steps=2,
    learning_rate=0.05,
    checkpoint_every=2,
    verbose=False,
  )
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_restore_latest_gives_the_final_state_and_its_metrics(finished_run):
  config = run_folder.read_config(finished_run)
  assert config.num_rounds == 3 and config.workdir == finished_run
  experiment, state, step = checkpoints.restore_latest(finished_run)
  assert step == 3
  rows = run_folder.read_metrics(finished_run)
  assert [r['round'] for r in rows] == [1, 2, 3]
  assert run_folder.read_metrics(finished_run, up_to_round=2)[-1]['round'] == 2
  # The restored state scores what the run logged after its last round.
  accuracy = evaluators.Evaluator(experiment)(state)['global_acc']
  np.testing.assert_allclose(accuracy, rows[-1]['global_acc'], atol=1e-6)


def test_one_checkpoint_holds_device_and_host_parts_and_legacy_ones_still_restore(tmp_path):
  folder = str(tmp_path / checkpoints.CHECKPOINTS)
  tree = {'w': np.arange(3.0, dtype=np.float32)}
  host = {'clock': {'time': 1.5, 'jobs': [{'client': 2}]}}
  with ocp.CheckpointManager(folder) as manager:
    manager.save(2, args=checkpoints.save_args(tree, host))
  with ocp.CheckpointManager(folder) as manager:
    # The layout before: the device pytree alone, the async clock in clock/<k>.json.
    manager.save(4, args=ocp.args.StandardSave({'w': tree['w'] + 1}))
  os.makedirs(tmp_path / checkpoints.LEGACY_CLOCKS)
  (tmp_path / checkpoints.LEGACY_CLOCKS / '4.json').write_text('{"time": 9.0}')
  with ocp.CheckpointManager(folder) as manager:
    device, restored_host = checkpoints.restore_step(manager, 2, tree)
    np.testing.assert_array_equal(device['w'], tree['w'])
    assert restored_host == host
    device, restored_host = checkpoints.restore_step(manager, 4, tree)
    np.testing.assert_array_equal(device['w'], tree['w'] + 1)
    assert restored_host == {'clock': {'time': 9.0}}


def test_a_torn_last_metrics_line_is_dropped_and_an_inner_one_named(tmp_path):
  path = tmp_path / run_folder.METRICS
  path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
  assert run_folder.read_metrics(str(tmp_path)) == [{'round': 1}, {'round': 2}]
  path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
  with pytest.raises(ConfigError, match='line 2 of .*metrics.jsonl is not JSON'):
    run_folder.read_metrics(str(tmp_path))
  assert run_folder.read_metrics(str(tmp_path / 'none')) == []


def test_config_errors_name_the_file(tmp_path):
  with pytest.raises(ConfigError, match='config.json: cannot read it'):
    run_folder.read_config(str(tmp_path))
  (tmp_path / run_folder.CONFIG).write_text(json.dumps({'num_clients': 3, 'old_flag': 1}))
  with pytest.raises(ConfigError, match='unknown field.*old_flag'):
    run_folder.read_config(str(tmp_path))
  os.makedirs(tmp_path / 'nockpt')
  (tmp_path / 'nockpt' / run_folder.CONFIG).write_text('{"num_clients": 3}')
  assert run_folder.read_config(str(tmp_path / 'nockpt')).num_clients == 3
