"""Tests of apfl_jax.algorithms.fedavg."""

from conftest import TinyModel
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.core import local_training


def make_fedavg(data, server_optimizer=None):
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))
  return FedAvg(
    TinyModel(), (6, 6, 1), schedule, optax.sgd(0.1), server_optimizer or optax.sgd(1.0)
  )


def test_round_is_sample_weighted_average_of_client_models(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([0, 2, 3], jnp.int32)
  new_state, metrics = jax.jit(alg.run_round)(state, cohort, jax.random.key(5), data)
  rng, _ = jax.random.split(jax.random.key(5))
  # Train the same clients one by one, with the keys the round uses.
  client_params = []
  for c in [0, 2, 3]:
    params, _ = local_training.train_client(
      state.server.params,
      alg.loss_fn,
      alg.client_optimizer,
      data,
      data.train_index[c],
      data.train_count[c],
      jax.random.fold_in(rng, c),
      alg.schedule,
    )
    client_params.append(params)
  weights = np.asarray(data.train_count)[[0, 2, 3]].astype(np.float64)
  weights /= weights.sum()
  expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *client_params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    new_state.server.params,
    expected,
  )
  assert metrics.loss.shape == (3,) and bool(np.all(metrics.finite))


def test_second_round_does_not_recompile(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data, optax.adam(1e-2))
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([1, 3], jnp.int32)
  state, _ = run_round(state, cohort, jax.random.key(1), data)
  state, _ = run_round(state, jnp.array([0, 2], jnp.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1


def test_nan_is_reported_as_not_finite(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  state = alg.init(jax.random.key(0))
  poisoned = state.replace(
    server=state.server.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.server.params))
  )
  _, metrics = jax.jit(alg.run_round)(
    poisoned, jnp.array([0, 1], jnp.int32), jax.random.key(1), data
  )
  assert not np.any(metrics.finite)


def test_size_buckets_give_the_lockstep_round(synthetic_federation):
  _, _, data = synthetic_federation
  counts = np.asarray(data.train_count)
  lockstep = make_fedavg(data)
  bucketed = lockstep.with_schedule(
    local_training.Schedule.create(
      8, 1, 0, int(counts.min()), int(counts.max()), client_counts=tuple(counts), max_buckets=3
    )
  )
  assert len(bucketed.schedule.buckets(3)) > 1
  state = lockstep.init(jax.random.key(0))
  cohort = jnp.array([2, 0, 3], jnp.int32)  # not sorted by size
  expected, expected_metrics = jax.jit(lockstep.run_round)(state, cohort, jax.random.key(5), data)
  got, metrics = jax.jit(bucketed.run_round)(state, cohort, jax.random.key(5), data)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    got.server.params,
    expected.server.params,
  )
  np.testing.assert_allclose(metrics.loss, expected_metrics.loss, rtol=1e-5)
