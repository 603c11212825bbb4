"""Tests of apfl_jax.algorithms.fedgen."""

from apfl_fixtures import make_fedgen, schedule_for
from conftest import TinyModel, run_two_rounds_compiling_once
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import create_algorithm
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.config.config import Config


def test_alpha_zero_trains_clients_exactly_like_fedavg(synthetic_federation):
  _, partition, data = synthetic_federation
  fedgen = make_fedgen(data, partition, alpha=0.0)
  fedavg = FedAvg(TinyModel(), (6, 6, 1), schedule_for(data), optax.sgd(0.1), optax.sgd(1.0))
  cohort = jnp.array([0, 1, 3], jnp.int32)
  a = fedgen.init(jax.random.key(0))
  b = fedavg.init(jax.random.split(jax.random.key(0))[0])
  jax.tree.map(np.testing.assert_array_equal, a.server.params, b.server.params)
  a, _ = jax.jit(fedgen.run_round)(a, cohort, jax.random.key(1), data)
  b, _ = jax.jit(fedavg.run_round)(b, cohort, jax.random.key(1), data)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
    a.server.params,
    b.server.params,
  )


def test_generator_trains_and_the_label_memory_accumulates(synthetic_federation):
  _, partition, data = synthetic_federation
  fedgen = make_fedgen(data, partition)
  run_round = jax.jit(fedgen.run_round)
  state = fedgen.init(jax.random.key(0))
  after_2, metrics = run_round(state, jnp.array([2], jnp.int32), jax.random.key(1), data)
  np.testing.assert_array_equal(after_2.server.seen_counts, partition.train_counts[2])
  assert not np.allclose(
    state.server.generator.params['Dense_0']['kernel'],
    after_2.server.generator.params['Dense_0']['kernel'],
  )
  assert bool(np.all(metrics.finite))
  # The next arrival adds to the memory instead of replacing it.
  after_0, _ = run_round(after_2, jnp.array([0], jnp.int32), jax.random.key(2), data)
  np.testing.assert_array_equal(
    after_0.server.seen_counts, partition.train_counts[2] + partition.train_counts[0]
  )


def test_official_setting_from_the_config_counts_rounds_and_compiles_once(synthetic_federation):
  dataset, partition, data = synthetic_federation
  config = Config(
    algorithm='fedgen',
    num_clients=4,
    noise_dim=8,
    generator_hidden_dim=16,
    generator_steps=3,
    generator_batch_size=8,
  )
  fedgen = create_algorithm(config, TinyModel(), dataset, partition, schedule_for(data))
  assert (fedgen.regularizer, fedgen.alpha, fedgen.beta) == ('fedgen', 10.0, 10.0)
  state, metrics = run_two_rounds_compiling_once(fedgen, data)
  assert int(state.server.round) == 2
  # The generator's learning-rate schedule has counted both rounds' steps.
  counts = [
    x
    for x in jax.tree.leaves(state.server.generator.opt_state)
    if jnp.issubdtype(x.dtype, jnp.integer)
  ]
  assert [int(c) for c in counts] == [2 * 3] * len(counts)
  assert bool(np.all(metrics.finite))
