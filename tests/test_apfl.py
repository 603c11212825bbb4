"""Tests of apfl_jax.algorithms.apfl."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax import generator as generator_lib
from apfl_jax.algorithms import apfl as apfl_lib
from apfl_jax.algorithms import knowledge_transfer
from apfl_jax.config import Config
from apfl_jax.data import client_data
from apfl_jax.data import partition as partition_lib
from apfl_fixtures import make_apfl, schedule_for
from conftest import TinyModel, make_synthetic_dataset


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def trained_state(alg, data, cohort=(0, 1, 2)):
  state = alg.init(jax.random.key(0))
  state, _ = jax.jit(alg.run_round)(state, jnp.asarray(cohort, jnp.int32),
                                    jax.random.key(1), data)
  return state


def test_beta_one_is_the_local_model_and_beta_zero_the_friend(synthetic_federation):
  _, partition, data = synthetic_federation
  local_only = make_apfl(data, partition, beta=1.0)
  state = trained_state(local_only, data)
  assert_trees_equal(local_only.personalized_params(state, data),
                     local_only.local_models(state))
  friend_only = make_apfl(data, partition, beta=0.0)
  personalized = friend_only.personalized_params(state, data)
  # Recompute the friends exactly as personalized_params does.
  keys = jax.random.split(friend_only._friend_key(state.server), 4)
  friends = jax.vmap(friend_only.train_friend, in_axes=(None, 0, 0, 0))(
      state.server, friend_only.local_models(state), jnp.asarray(friend_only.label_counts),
      keys)
  assert_trees_equal(personalized, friends)
  assert not np.allclose(personalized['head']['kernel'],
                         friend_only.local_models(state)['head']['kernel'])


def test_interpolate_is_convex_combination():
  mixed = apfl_lib.interpolate({'w': jnp.array([0.0, 10.0])}, {'w': jnp.array([10.0, 0.0])},
                               0.25)
  np.testing.assert_allclose(mixed["w"], [7.5, 2.5])  # 0.25 * local + 0.75 * friend


def test_client_that_never_trained_uses_the_global_model(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  state = trained_state(alg, data, cohort=(0, 1, 2))
  local = alg.local_models(state)
  assert list(np.asarray(state.clients.has_local)) == [True, True, True, False]
  jax.tree.map(lambda l, g: np.testing.assert_array_equal(l[3], g), local, state.server.params)
  jax.tree.map(lambda l, g: np.testing.assert_array_equal(l[0], g[0]),
               local, state.clients.local_params)


def test_round_trains_the_generator_and_does_not_recompile(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  new_state, metrics = run_round(state, jnp.array([0, 1], jnp.int32), jax.random.key(1), data)
  new_state, _ = run_round(new_state, jnp.array([2, 3], jnp.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1
  assert int(new_state.server.round) == 2
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state.server.generator.params,
                         new_state.server.generator.params)
  assert all(jax.tree.leaves(changed))
  assert bool(np.all(metrics.finite))


def test_friend_learns_a_class_no_client_holds(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  state = trained_state(alg, data)
  server = state.server.replace(taught_labels=jnp.array([1.0, 1.0, 1.0, 0.0]))
  only_class_3 = jnp.array([0.0, 0.0, 0.0, 1.0])
  friend = alg.train_friend(server, state.server.params, only_class_3, jax.random.key(4))
  samples = generator_lib.generate(alg.setup.generator, server.generator.params,
                                   jax.random.key(5), jnp.full((32,), 3), alg.setup.noise_dim,
                                   alg.setup.noise_distribution,
                                   reference_labels=jnp.array([0, 1, 2] * 8))
  logits = alg.model.apply({'params': friend}, samples, method='head_logits')
  assert np.mean(np.argmax(logits, -1) == 3) > 0.9
  assert np.all(np.isfinite(logits))


def test_unseen_class_probe_is_finite(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition, friend_labels='all')
  state = trained_state(alg, data)
  probe = alg.unseen_class_params(state, data)
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(probe))


def test_image_generator_trains_whole_friend_models():
  dataset = make_synthetic_dataset(shape=(8, 8, 1))
  partition = partition_lib.partition_dataset(
      dataset.train_labels, dataset.test_labels, num_clients=3, scheme='iid', seed=0,
      num_classes=4)
  data = client_data.build_federated_data(dataset, partition, test_multiple=8)
  setup = knowledge_transfer.create_setup(
      Config(generator='image', noise_dim=8, generator_steps=3, generator_batch_size=8),
      TinyModel(), dataset, np.eye(4, dtype=np.float32))
  friend = apfl_lib.FriendSetup(steps=3, batch_size=8, learning_rate=0.1, init='local',
                       labels='all', beta=0.5)
  alg = apfl_lib.APFL(TinyModel(), (8, 8, 1), schedule_for(data), optax.sgd(0.1), optax.sgd(1.0),
             setup, friend, partition.train_counts, seed=0)
  state = trained_state(alg, data, cohort=(0, 1, 2))
  personalized = alg.personalized_params(state, data)
  local = alg.local_models(state)
  # Both body and head moved: the friend trained end to end on generated images.
  for part in ('body', 'head'):
    assert not np.allclose(personalized[part]['kernel'], local[part]['kernel'])
