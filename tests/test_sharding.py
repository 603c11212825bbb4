"""The cohort sharded over 4 CPU devices trains exactly like the single-device round.

XLA_FLAGS must be set before JAX is imported, so the check runs in a subprocess that
executes this file as a script.
"""

import os
import pathlib
import subprocess
import sys

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NUM_DEVICES = 4


def test_sharded_round_equals_single_device_round():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={_NUM_DEVICES}')
  result = subprocess.run([sys.executable, __file__], env=env, cwd=_REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'sharded round OK' in result.stdout


def test_no_distributed_job_without_coordinator(monkeypatch):
  from apfl_jax import sharding  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  assert not sharding.maybe_initialize_distributed()


def _check_sharded_round():
  """Runs 2 rounds both ways on 4 devices and compares; raises on any mismatch."""
  sys.path[:0] = [str(_REPO), str(_REPO / 'tests')]
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from apfl_jax import local_training, sharding  # pylint: disable=import-outside-toplevel
  from apfl_jax.algorithms.fedavg import FedAvg  # pylint: disable=import-outside-toplevel
  from apfl_jax.data import client_data  # pylint: disable=import-outside-toplevel
  from apfl_jax.data import partition as partition_lib  # pylint: disable=import-outside-toplevel
  from conftest import TinyModel, make_synthetic_dataset  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == _NUM_DEVICES, jax.devices()
  dataset = make_synthetic_dataset()
  partition = partition_lib.partition_dataset(
      dataset.train_labels, dataset.test_labels, num_clients=10, scheme='dirichlet',
      seed=0, num_classes=dataset.num_classes, dirichlet_alpha=0.5, min_samples=5)
  data = client_data.build_federated_data(dataset, partition)
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(
      batch_size=4, local_epochs=1, local_steps=0, min_count=int(counts.min()),
      max_count=int(counts.max()))
  algorithm = FedAvg(TinyModel(), dataset.image_shape, schedule, optax.sgd(0.1),
                     optax.sgd(1.0))
  mesh = sharding.client_mesh()
  sharded_round = sharding.shard_cohort_round(algorithm, mesh)
  single_round = jax.jit(algorithm.run_round)

  cohort = jnp.array([7, 0, 3, 9, 2, 5, 1, 8], jnp.int32)
  single = sharded = algorithm.init(jax.random.key(0))
  for r in range(2):
    rng = jax.random.key(100 + r)
    single, single_metrics = single_round(single, cohort, rng, data)
    sharded, sharded_metrics = sharded_round(sharded, cohort, rng, data)
    np.testing.assert_allclose(sharded_metrics.loss, single_metrics.loss, rtol=1e-5,
                               atol=1e-6)
    for a, b in zip(jax.tree.leaves(sharded.server.params),
                    jax.tree.leaves(single.server.params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not jnp.allclose(single.server.params['head']['bias'],
                          algorithm.init(jax.random.key(0)).server.params['head']['bias'])

  # Each device holds (and so trained) its own quarter of the cohort.
  shards = sharded_metrics.loss.addressable_shards
  assert len(shards) == _NUM_DEVICES
  assert {s.data.shape for s in shards} == {(len(cohort) // _NUM_DEVICES,)}
  # The per-device program does about a quarter of the single-device work.
  args = (single, cohort, jax.random.key(0), data)
  flops_single = single_round.lower(*args).compile().cost_analysis()['flops']
  flops_sharded = sharded_round.jitted.lower(*args).compile().cost_analysis()['flops']
  assert flops_sharded < 0.4 * flops_single, (flops_sharded, flops_single)

  try:
    sharded_round(sharded, cohort[:6], jax.random.key(0), data)
  except ValueError as e:
    assert 'not a multiple' in str(e)
  else:
    raise AssertionError('a cohort of 6 on 4 devices must be refused')
  print('sharded round OK')


if __name__ == '__main__':
  _check_sharded_round()
