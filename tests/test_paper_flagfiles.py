"""The paper's flagfiles run AP-FL: one round each on mocked tfds data (nothing downloaded).

`experiments/paper/cifar10.flags` and `emnist.flags`, parsed as `experiments/main.py`
parses them, with only the sizes cut on the command line (clients, rounds, generator and
friend budgets), train and evaluate AP-FL for one round on `tfds.testing.mock_data`
records (see tests/test_datasets.py).
"""

import json
import os

from absl import flags
import numpy as np
import pytest
from test_datasets import CIFAR10_NAMES, _fake_prepare, _mock_records, _random_records

from apfl_jax.config import config as config_lib
from apfl_jax.runner import train

PAPER = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments', 'paper')
# Sizes and compile time only (one size group): the algorithm, beta, model, partition,
# batch and learning rate are the file's.
TINY = [
  '--num_clients=2',
  '--num_rounds=1',
  '--eval_every=1',
  '--checkpoint_every=5',
  '--max_client_buckets=1',
  '--generator_steps=1',
  '--generator_batch_size=8',
  '--apfl_synthetic_per_class=1',
  '--apfl_friend_batch_size=16',
  '--verbose=false',
]
# flagfile -> (tfds name, class names, image shape, classes, beta of the paper)
FLAGFILES = {
  'cifar10.flags': ('cifar10', CIFAR10_NAMES, (32, 32, 3), 10, 0.01),
  'emnist.flags': ('emnist/balanced', None, (28, 28, 1), 47, 0.1),
}


@pytest.fixture
def parsed_flags():
  config_lib.define_flags()
  flags.FLAGS.unparse_flags()
  yield flags.FLAGS
  flags.FLAGS.unparse_flags()


@pytest.mark.slow
@pytest.mark.parametrize('flagfile', sorted(FLAGFILES))
def test_paper_flagfile_runs_apfl_for_one_round(parsed_flags, tmp_path, flagfile):
  tfds_name, names, shape, num_classes, beta = FLAGFILES[flagfile]
  rng = np.random.default_rng(0)
  labels = np.arange(4 * num_classes) % num_classes
  records = {
    'train': _random_records(rng, len(labels), shape, labels),
    'test': _random_records(rng, 2 * num_classes, shape, labels),
  }
  data_dir = tmp_path / 'data'
  _fake_prepare(data_dir, tfds_name, {'train': len(labels), 'test': 2 * num_classes}, names)
  parsed_flags(
    ['prog', f'--flagfile={os.path.join(PAPER, flagfile)}', f'--data_dir={data_dir}', *TINY]
  )
  config = config_lib.from_flags(parsed_flags)
  assert (config.algorithm, config.apfl_beta, config.generator) == ('apfl', beta, 'image')
  assert (config.embedding, config.partition, config.dirichlet_alpha) == (
    'minilm',
    'dirichlet',
    0.1,
  )
  with _mock_records(data_dir, records):
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    (row,) = [json.loads(line) for line in f]
  assert row['round'] == 1 and 0.0 <= row['personalized_acc'] <= 1.0
  assert summary['final_personalized_acc'] == row['personalized_acc']


def test_cifar100_flagfile_parses_to_apfl_with_the_papers_beta(parsed_flags):
  parsed_flags(['prog', f'--flagfile={os.path.join(PAPER, "cifar100.flags")}'])
  config = config_lib.from_flags(parsed_flags)
  assert (config.dataset, config.model, config.algorithm, config.apfl_beta) == (
    'cifar100',
    'resnet8',
    'apfl',
    0.01,
  )


def test_async_apfl_flagfile_parses_for_every_mode_of_its_header(parsed_flags):
  path = os.path.join(os.path.dirname(PAPER), 'async', 'apfl_async.flags')
  modes = [
    [],
    ['--server=fedasync', '--num_rounds=120', '--dropout_round=30'],
    ['--server=sync', '--num_rounds=24', '--dropout_round=6'],
    ['--algorithm=fedavg'],
    ['--algorithm=local', '--server=sync', '--num_rounds=24', '--dropout_round=6'],
  ]
  for extra in modes:
    parsed_flags.unparse_flags()
    parsed_flags(['prog', f'--flagfile={path}', *extra])
    config = config_lib.from_flags(parsed_flags)
    assert config.dropout_clients == 'monopoly' and config.speed_distribution == 'lognormal'
    assert config.apfl_unseen_control
