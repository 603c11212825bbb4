"""Tests of apfl_jax.algorithms.fedprox."""

from conftest import TinyModel, assert_trees_close, run_two_rounds_compiling_once
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.fedprox import FedProx
from apfl_jax.core import local_training


def make_schedule(data):
  counts = np.asarray(data.train_count)
  return local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))


def make_fedprox(data, mu, server_optimizer=None):
  return FedProx(
    TinyModel(),
    (6, 6, 1),
    make_schedule(data),
    optax.sgd(0.1),
    server_optimizer or optax.sgd(1.0),
    mu,
  )


def test_zero_mu_is_fedavg(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedprox(data, 0.0)
  fedavg = FedAvg(TinyModel(), (6, 6, 1), make_schedule(data), optax.sgd(0.1), optax.sgd(1.0))
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([0, 2, 3], jnp.int32)
  prox_state, prox_metrics = jax.jit(alg.run_round)(state, cohort, jax.random.key(5), data)
  avg_state, avg_metrics = jax.jit(fedavg.run_round)(state, cohort, jax.random.key(5), data)
  assert_trees_close(prox_state.server.params, avg_state.server.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(prox_metrics.loss, avg_metrics.loss, rtol=1e-6)
  assert alg.personalized_axis is None
  assert alg.personalized_params(prox_state, data) is alg.global_params(prox_state)


def test_positive_mu_keeps_the_client_closer_to_the_global_model(synthetic_federation):
  _, _, data = synthetic_federation
  distances = []
  for mu in (0.0, 1.0):
    alg = make_fedprox(data, mu)
    state = alg.init(jax.random.key(0))
    _, output = jax.jit(alg.client_update)(
      state.server, (), data.train_index[1], data.train_count[1], jax.random.key(3), data
    )
    distances.append(float(optax.tree.norm(output.update)))
  assert 0.0 < distances[1] < distances[0]


def test_second_round_does_not_recompile(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedprox(data, 0.1, optax.adam(1e-2))
  state, metrics = run_two_rounds_compiling_once(alg, data)
  assert bool(np.all(metrics.finite))
