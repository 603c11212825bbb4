"""Every client-map backend trains exactly like the one-call vmapped round.

The sharded backends need several devices: XLA_FLAGS must be set before JAX is
imported, so those checks run in a subprocess that executes this file as a script on
4 forced CPU devices. Comparisons use float32 matmuls (`default_matmul_precision
('highest')`), so they hold on GPUs (TF32 by default) too.
"""

import os
import pathlib
import subprocess
import sys

from conftest import TinyModel, make_synthetic_dataset
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.asynchrony import clock, simulator
from apfl_jax.config.config import Config
from apfl_jax.core import local_training, sharding
from apfl_jax.core.cohort import ClientMap
from apfl_jax.data import client_data
from apfl_jax.data import partition as partition_lib

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NUM_DEVICES = 4
_TOLERANCE = {'rtol': 1e-5, 'atol': 1e-6}


def test_chunks_pad_and_keep_order():
  """7 clients in chunks of 3 (padded to 9) give the vmapped result, in order."""
  fn = lambda x, shared: {'y': x * shared + 1.0, 'row': jnp.stack([x, -x])}
  xs = jnp.arange(7.0)
  expected = jax.vmap(fn, in_axes=(0, None))(xs, 2.0)
  chunked = jax.jit(lambda x: ClientMap(chunk_size=3)(fn, (0, None), x, 2.0))(xs)
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_multi_device_backends_equal_one_call():
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=f'{_REPO}:{_REPO / "tests"}',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={_NUM_DEVICES}',
  )
  result = subprocess.run(
    [sys.executable, __file__], env=env, cwd=_REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'client map backends OK' in result.stdout


def _federation(num_clients):
  dataset = make_synthetic_dataset()
  partition = partition_lib.partition_dataset(
    dataset.train_labels,
    dataset.test_labels,
    num_clients=num_clients,
    scheme='dirichlet',
    seed=0,
    num_classes=dataset.num_classes,
    dirichlet_alpha=0.5,
    min_samples=5,
  )
  data = client_data.build_federated_data(dataset, partition)
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(
    batch_size=4,
    local_epochs=1,
    local_steps=0,
    min_count=int(counts.min()),
    max_count=int(counts.max()),
    client_counts=tuple(counts.tolist()),
    max_buckets=3,
  )
  return dataset, data, schedule


def _assert_states_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **_TOLERANCE)


def _check_backends():
  """Two rounds of every backend against the one-call round; raises on a mismatch."""
  assert jax.device_count() == _NUM_DEVICES, jax.devices()
  dataset, data, schedule = _federation(10)
  grouped = FedAvg(TinyModel(), dataset.image_shape, schedule, optax.sgd(0.1), optax.sgd(1.0))
  assert len(schedule.buckets(7)) > 1
  one_group = grouped.with_schedule(
    local_training.Schedule.create(
      4, 1, 0, int(np.min(data.train_count)), int(np.max(data.train_count))
    )
  )
  mesh = sharding.client_mesh()
  backends = {
    'size groups': grouped,
    'chunks of 2': one_group.with_client_map(ClientMap(chunk_size=2)),
    'sharded over 4 devices': one_group.with_client_map(ClientMap(mesh=mesh)),
    'sharded size groups in chunks of 1': grouped.with_client_map(
      ClientMap(chunk_size=1, mesh=mesh)
    ),
  }
  # 7 clients: not a multiple of the 4 devices nor of a chunk (padding is dropped).
  cohorts = [
    jnp.array([7, 0, 3, 9, 2, 5, 1], jnp.int32),
    jnp.array([8, 1, 4, 6, 2, 0, 9], jnp.int32),
  ]
  init = one_group.init(jax.random.key(0))
  reference_round = jax.jit(one_group.run_round)
  reference, ref_metrics = init, []
  for r, cohort in enumerate(cohorts):
    reference, metrics = reference_round(reference, cohort, jax.random.key(100 + r), data)
    ref_metrics.append(metrics)
  flops = {}  # of each backend's (per-device) program
  for name, algorithm in backends.items():
    run_round = jax.jit(algorithm.run_round)
    state = sharding.replicate(init, algorithm.client_map.mesh)
    placed = sharding.replicate(data, algorithm.client_map.mesh)
    for r, cohort in enumerate(cohorts):
      state, metrics = run_round(state, cohort, jax.random.key(100 + r), placed)
      np.testing.assert_allclose(metrics.loss, ref_metrics[r].loss, **_TOLERANCE, err_msg=name)
    _assert_states_close(state.server.params, reference.server.params)
    assert run_round._cache_size() == 1, name
    flops[name] = (
      run_round.lower(state, cohorts[0], jax.random.key(0), placed)
      .compile()
      .cost_analysis()['flops']
    )
  # Each device's program trains 2 of the 7 clients (padded to 8), the others all 7.
  one_call = (
    reference_round.lower(reference, cohorts[0], jax.random.key(0), data)
    .compile()
    .cost_analysis()['flops']
  )
  assert flops['sharded over 4 devices'] < 0.4 * one_call, (flops, one_call)
  print('client map backends OK')


def test_async_buffer_trains_in_size_groups():
  """FedBuff's buffer in size groups equals the lockstep buffer; repeats fall back."""
  dataset, data, schedule = _federation(6)
  algorithm = FedAvg(TinyModel(), dataset.image_shape, schedule, optax.sgd(0.1), optax.sgd(1.0))
  assert len(schedule.buckets(6)) > 1
  config = Config(
    num_clients=6,
    server='fedbuff',
    buffer_size=6,
    concurrency=6,
    speed_distribution='constant',
    max_client_buckets=3,
  )
  counts = np.asarray(data.train_count)
  sim = simulator.AsyncSimulator(algorithm, config, 6, clock.client_step_counts(schedule, counts))
  state = sim.init(algorithm.init(jax.random.key(0)))
  ids = np.arange(6, dtype=np.int32)
  args = (
    state.device,
    ids,
    ids,
    ids,
    np.zeros(6, np.int32),
    np.ones(6, np.float32),
    jax.random.key(3),
    data,
  )
  with jax.default_matmul_precision('highest'):
    grouped, grouped_metrics = sim.device_step(*args, size_groups=True)
    lockstep, lockstep_metrics = sim.device_step(*args, size_groups=False)
  np.testing.assert_allclose(grouped_metrics.loss, lockstep_metrics.loss, **_TOLERANCE)
  _assert_states_close(grouped.servers, lockstep.servers)
  # The largest client three times exceeds the bound of the third position.
  largest = int(np.argmax(counts))
  assert schedule.fits_buckets(counts)
  assert not schedule.fits_buckets(counts[[largest] * 3])


if __name__ == '__main__':
  with jax.default_matmul_precision('highest'):
    _check_backends()
