"""Tests of apfl_jax.algorithms.fedrep."""

from conftest import TinyModel, assert_trees_close, run_two_rounds_compiling_once
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.fedrep import FedRep
from apfl_jax.core import local_training


def make_fedrep(data, server_optimizer=None):
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))
  return FedRep(
    TinyModel(),
    (6, 6, 1),
    schedule,
    optax.sgd(0.1),
    server_optimizer or optax.sgd(1.0),
    num_clients=4,
    head_epochs=2,
  )


def test_phases_train_one_part_each_and_the_server_averages_bodies(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedrep(data)
  state = alg.init(jax.random.key(0))
  body, heads = state.server.body, state.clients.head
  cohort = [0, 2, 3]
  new_state, metrics = jax.jit(alg.run_round)(
    state, jnp.array(cohort, jnp.int32), jax.random.key(5), data
  )
  client_rng, _ = jax.random.split(jax.random.key(5))
  train_head, train_body = jax.jit(alg.train_head), jax.jit(alg.train_body)
  bodies = []
  for c in cohort:
    head_key, body_key = jax.random.split(jax.random.fold_in(client_rng, c))
    head = jax.tree.map(lambda x: x[c], heads)
    new_head, _ = train_head(body, head, data.train_index[c], data.train_count[c], head_key, data)
    assert not np.allclose(new_head['kernel'], head['kernel'])
    new_body, _ = train_body(
      body, new_head, data.train_index[c], data.train_count[c], body_key, data
    )
    assert not np.allclose(new_body['kernel'], body['kernel'])
    bodies.append(new_body)
    # The client keeps the head of the head phase: the body phase left it alone.
    assert_trees_close(
      jax.tree.map(lambda x: x[c], new_state.clients.head), new_head, rtol=1e-5, atol=1e-6
    )
  # Client 1 did not train: its head is untouched.
  assert_trees_close(
    jax.tree.map(lambda x: x[1], new_state.clients.head),
    jax.tree.map(lambda x: x[1], heads),
    rtol=0,
    atol=0,
  )
  # The server holds only the body: the sample-weighted mean of the trained bodies.
  weights = np.asarray(data.train_count)[cohort].astype(np.float64)
  weights /= weights.sum()
  expected = jax.tree.map(lambda *bs: sum(w * b for w, b in zip(weights, bs)), *bodies)
  assert set(vars(new_state.server)) == {'body', 'opt_state'}
  assert_trees_close(new_state.server.body, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
    new_state.clients.weight, np.where(np.isin(range(4), cohort), data.train_count, 0)
  )
  assert bool(np.all(metrics.finite))


def test_personalized_and_global_models(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedrep(data)
  state = alg.init(jax.random.key(0))
  initial_head = jax.tree.map(lambda x: x[0], state.clients.head)
  assert_trees_close(alg.global_params(state)['head'], initial_head, rtol=1e-6)
  state, _ = jax.jit(alg.run_round)(state, jnp.array([0, 1, 2], jnp.int32), jax.random.key(1), data)
  personal = alg.personalized_params(state, data)
  assert alg.personalized_axis == 0
  for c in range(4):
    assert_trees_close(
      jax.tree.map(lambda x: x[c], personal['body']), state.server.body, rtol=0, atol=0
    )
  assert personal['head'] is state.clients.head
  kernels = np.asarray(state.clients.head['kernel'])
  assert not np.allclose(kernels[0], kernels[1])
  # The global head averages the heads of the clients that trained, by their examples.
  weights = np.asarray(data.train_count)[:3].astype(np.float64)
  expected = np.tensordot(weights / weights.sum(), kernels[:3], axes=1)
  np.testing.assert_allclose(
    alg.global_params(state)['head']['kernel'], expected, rtol=1e-5, atol=1e-6
  )


def test_second_round_does_not_recompile(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedrep(data, optax.adam(1e-2))
  state, _ = run_two_rounds_compiling_once(alg, data)
