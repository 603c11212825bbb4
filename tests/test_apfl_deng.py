"""Tests of apfl_jax.algorithms.apfl_deng."""

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

from apfl_jax.algorithms.apfl_deng import APFLDeng
from apfl_jax.algorithms.local import LocalOnly
from apfl_jax.core import local_training


def make_schedule(data):
  counts = np.asarray(data.train_count)
  return local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))


def make_apfl_deng(data, alpha, alpha_learning_rate, server_optimizer=None):
  return APFLDeng(
    TinyModel(),
    (6, 6, 1),
    make_schedule(data),
    optax.sgd(0.1),
    server_optimizer or optax.sgd(1.0),
    alpha,
    alpha_learning_rate,
    num_clients=4,
  )


def test_fixed_alpha_one_is_fedavg_plus_local_only(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_apfl_deng(data, 1.0, 0.0)
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([0, 2, 3], jnp.int32)
  new_state, metrics = jax.jit(alg.run_round)(state, cohort, jax.random.key(5), data)
  # The w-part is FedAvg's local training, so the global model is FedAvg's.
  fedavg_state, fedavg_metrics = fedavg_reference_round(alg.schedule, data, cohort)
  assert_trees_close(new_state.server.params, fedavg_state.server.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics.loss, fedavg_metrics.loss, rtol=1e-6)
  # With alpha = 1 the mixed model is v, trained as in Local-only with the same keys.
  local = LocalOnly(TinyModel(), (6, 6, 1), alg.schedule, optax.sgd(0.1), num_clients=4)
  local_state, _ = jax.jit(local.run_round)(
    local.init(jax.random.key(0)), cohort, jax.random.key(5), data
  )
  assert_trees_close(new_state.clients.params, local_state.clients.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_state.clients.alpha, np.ones(4))
  assert_trees_close(
    alg.personalized_params(new_state, data), new_state.clients.params, rtol=1e-6, atol=1e-7
  )


def test_alpha_is_learned_within_zero_and_one(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_apfl_deng(data, 0.5, 50.0)
  state = alg.init(jax.random.key(0))
  # A personal model away from the global one, so that alpha has a gradient.
  state = state.replace(
    clients=state.clients.replace(params=jax.tree.map(lambda x: x * 0.5, state.clients.params))
  )
  state, metrics = jax.jit(alg.run_round)(
    state, jnp.array([0, 1, 2], jnp.int32), jax.random.key(1), data
  )
  alpha = np.asarray(state.clients.alpha)
  assert np.all((alpha >= 0.0) & (alpha <= 1.0))
  assert np.all(alpha[:3] != 0.5) and alpha[3] == 0.5
  assert np.any((alpha[:3] == 0.0) | (alpha[:3] == 1.0))
  assert bool(np.all(metrics.finite))
  # The personalized model mixes each client's v with the current global model.
  personal = alg.personalized_params(state, data)
  for c in range(4):
    expected = jax.tree.map(
      lambda v, w: alpha[c] * v[c] + (1 - alpha[c]) * w, state.clients.params, state.server.params
    )
    assert_trees_close(jax.tree.map(lambda x: x[c], personal), expected, rtol=1e-5, atol=1e-6)


def test_second_round_does_not_recompile(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_apfl_deng(data, 0.5, 0.1, optax.adam(1e-2))
  state, _ = run_two_rounds_compiling_once(alg, data)
