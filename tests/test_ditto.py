"""Tests of apfl_jax.algorithms.ditto."""

from conftest import (
  TinyModel,
  assert_trees_close,
  fedavg_reference_round,
  run_two_rounds_compiling_once,
)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.ditto import Ditto, personal_key
from apfl_jax.algorithms.local import LocalClient, LocalOnly
from apfl_jax.core import local_training


def make_schedule(data):
  counts = np.asarray(data.train_count)
  return local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))


def make_ditto(data, lam, server_optimizer=None):
  return Ditto(
    TinyModel(),
    (6, 6, 1),
    make_schedule(data),
    optax.sgd(0.1),
    server_optimizer or optax.sgd(1.0),
    lam,
    num_clients=4,
  )


def test_zero_lambda_is_fedavg_plus_local_only(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_ditto(data, 0.0)
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([0, 2, 3], jnp.int32)
  new_state, metrics = jax.jit(alg.run_round)(state, cohort, jax.random.key(5), data)
  # The global model is FedAvg's.
  fedavg_state, fedavg_metrics = fedavg_reference_round(alg.schedule, data, cohort)
  assert_trees_close(new_state.server.params, fedavg_state.server.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics.loss, fedavg_metrics.loss, rtol=1e-6)
  # The personal models are Local-only training with the personal keys.
  local = LocalOnly(TinyModel(), (6, 6, 1), alg.schedule, optax.sgd(0.1), num_clients=4)
  client_rng, _ = jax.random.split(jax.random.key(5))
  before, after = state.clients.params, new_state.clients.params
  for c in range(4):
    if c in (0, 2, 3):
      expected, _ = jax.jit(local.client_update)(
        (),
        LocalClient(params=jax.tree.map(lambda x: x[c], before)),
        data.train_index[c],
        data.train_count[c],
        personal_key(jax.random.fold_in(client_rng, c)),
        data,
      )
      expected = expected.params
    else:
      expected = jax.tree.map(lambda x: x[c], before)
    assert_trees_close(jax.tree.map(lambda x: x[c], after), expected, rtol=1e-5, atol=1e-6)
  assert alg.personalized_axis == 0
  assert alg.personalized_params(new_state, data) is new_state.clients.params
  assert alg.global_params(new_state) is new_state.server.params


def test_lambda_pulls_the_personal_model_towards_the_global_one(synthetic_federation):
  _, _, data = synthetic_federation
  distances = []
  for lam in (0.0, 1.0):
    alg = make_ditto(data, lam)
    state = alg.init(jax.random.key(0))
    # A personal model far from the global one.
    client = state.clients.replace(params=jax.tree.map(lambda x: x[0] + 0.5, state.clients.params))
    new_client, _ = jax.jit(alg.client_update)(
      state.server, client, data.train_index[0], data.train_count[0], jax.random.key(3), data
    )
    gap = jax.tree.map(jnp.subtract, new_client.params, state.server.params)
    distances.append(float(optax.tree.norm(gap)))
  assert distances[1] < distances[0]


def test_second_round_does_not_recompile(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_ditto(data, 0.1, optax.adam(1e-2))
  state, metrics = run_two_rounds_compiling_once(alg, data)
  assert bool(np.all(metrics.finite))


def test_size_buckets_keep_each_personal_model_with_its_client(synthetic_federation):
  _, _, data = synthetic_federation
  counts = np.asarray(data.train_count)
  lockstep = make_ditto(data, 0.1)
  bucketed = lockstep.with_schedule(
    local_training.Schedule.create(
      8, 1, 0, int(counts.min()), int(counts.max()), client_counts=tuple(counts), max_buckets=4
    )
  )
  assert len(bucketed.schedule.buckets(4)) > 1
  state = lockstep.init(jax.random.key(0))
  cohort = jnp.array([1, 3, 0, 2], jnp.int32)
  expected, _ = jax.jit(lockstep.run_round)(state, cohort, jax.random.key(3), data)
  got, _ = jax.jit(bucketed.run_round)(state, cohort, jax.random.key(3), data)
  assert_trees_close(got.clients, expected.clients, rtol=1e-5, atol=1e-6)
  run_two_rounds_compiling_once(bucketed, data)
