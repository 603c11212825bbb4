"""Tests of apfl_jax.algorithms.registry: an algorithm is one file found by name."""

import os
import shutil
import subprocess
import sys

import pytest
from test_reliability import write_fake_fashion_mnist

from apfl_jax.algorithms import registry
from apfl_jax.config import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_algorithm_is_registered_with_its_options():
  assert set(registry.names()) == {
    'fedavg',
    'local',
    'fedgen',
    'apfl',
    'fedprox',
    'ditto',
    'fedrep',
    'apfl_deng',
    'fedavg_ft',
  }
  assert registry.get('fedprox').options.__name__ == 'FedProxOptions'
  assert registry.get('fedavg').options is None
  assert registry.get('apfl').defaults['generator'] == 'image'
  # Each algorithm's options are Config fields, hence flags.
  assert config_lib.Config().fedprox_mu == 0.01
  assert config_lib.Config().apfl_beta == 0.1


def test_registering_another_class_under_a_taken_name_is_refused():
  class Other:
    pass

  with pytest.raises(ValueError, match="'fedavg' is registered twice"):
    registry.register('fedavg')(Other)


@pytest.mark.slow
def test_a_new_algorithm_file_runs_by_name_and_keeps_the_contract_with_no_other_edit(tmp_path):
  """A copy of fedavg.py registered as 'fedavg_copy' is all a new algorithm needs: main.py
  runs it by name, and the registry's contract tests (`test_contract.py`) pick it up."""
  tree = tmp_path / 'tree'
  shutil.copytree(
    os.path.join(REPO, 'apfl_jax'), tree / 'apfl_jax', ignore=shutil.ignore_patterns('__pycache__')
  )
  shutil.copytree(os.path.join(REPO, 'experiments'), tree / 'experiments')
  shutil.copytree(
    os.path.join(REPO, 'tests'), tree / 'tests', ignore=shutil.ignore_patterns('__pycache__')
  )
  source = (tree / 'apfl_jax' / 'algorithms' / 'fedavg.py').read_text()
  assert "@registry.register('fedavg')" in source
  copy = source.replace("@registry.register('fedavg')", "@registry.register('fedavg_copy')")
  (tree / 'apfl_jax' / 'algorithms' / 'fedavg_copy.py').write_text(copy)
  write_fake_fashion_mnist(tmp_path / 'data')
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS='cpu')
  args = [
    sys.executable,
    str(tree / 'experiments' / 'main.py'),
    f'--data_dir={tmp_path / "data"}',
    '--algorithm=fedavg_copy',
    '--num_clients=2',
    '--partition=iid',
    '--num_rounds=1',
    '--local_epochs=0',
    '--local_steps=1',
    '--batch_size=4',
    f'--workdir={tmp_path / "run"}',
    '--noverbose',
  ]
  result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'run' / 'metrics.jsonl').read_text().count('"round": 1') == 1
  assert '"algorithm": "fedavg_copy"' in (tmp_path / 'run' / 'config.json').read_text()

  contract = subprocess.run(
    [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-p',
      'no:cacheprovider',
      '-k',
      'fedavg_copy',
      str(tree / 'tests' / 'test_contract.py'),
    ],
    cwd=tree,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert contract.returncode == 0, contract.stdout[-2000:]
  assert '1 passed' in contract.stdout
