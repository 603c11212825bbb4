"""Tests of apfl_jax.algorithms.apfl."""

from apfl_fixtures import make_apfl, schedule_for
from conftest import (
  TinyModel,
  assert_trees_close,
  assert_trees_equal,
  make_synthetic_dataset,
  make_synthetic_federation,
)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apfl_jax.algorithms import apfl as apfl_lib
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.algorithms.local import LocalOnly
from apfl_jax.asynchrony import simulator
from apfl_jax.config.config import Config
from apfl_jax.core import local_training
from apfl_jax.data import client_data
from apfl_jax.data import partition as partition_lib


def run_rounds(alg, data, cohorts, state=None):
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0)) if state is None else state
  for r, cohort in enumerate(cohorts):
    state, _ = run_round(state, jnp.asarray(cohort, jnp.int32), jax.random.key(r + 1), data)
  return state


def row(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@pytest.fixture(scope='module')
def after_one_round():
  """(partition, data, state) of a default AP-FL after one round of clients 0, 1, 2.

  The round does not read the friend's settings (beta, labels): they only enter
  personalization, so tests vary them on this one state.
  """
  _, partition, data = make_synthetic_federation()
  return partition, data, run_rounds(make_apfl(data, partition), data, [(0, 1, 2)])


def test_interpolate_is_convex_combination():
  mixed = apfl_lib.interpolate({'w': jnp.array([0.0, 10.0])}, {'w': jnp.array([10.0, 0.0])}, 0.25)
  np.testing.assert_allclose(mixed['w'], [7.5, 2.5])  # 0.25 * local + 0.75 * friend


def test_beta_one_is_the_local_model_and_beta_zero_the_friend(after_one_round):
  partition, data, state = after_one_round
  local_only = make_apfl(data, partition, beta=1.0)
  assert_trees_equal(local_only.personalized_params(state, data), local_only.local_models(state))
  friend_only = make_apfl(data, partition, beta=0.0)
  personalized = friend_only.personalized_params(state, data)
  friends = friend_only.friend_models(
    state, jnp.arange(4), jnp.asarray(partition.train_counts, jnp.float32)
  )
  assert_trees_equal(personalized, friends)
  assert not np.allclose(
    personalized['head']['kernel'], friend_only.local_models(state)['head']['kernel']
  )


def test_persistent_local_model_is_the_local_only_model(synthetic_federation):
  # Every client joins every round: AP-FL's local models are exactly Local's models
  # (trained on the same batches), while the global model moves on by FedAvg.
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  local = LocalOnly(TinyModel(), (6, 6, 1), schedule_for(data), optax.sgd(0.1), 4)
  cohorts = [(0, 1, 2, 3)] * 3
  state = run_rounds(alg, data, cohorts)
  local_state = local.init(jax.random.split(jax.random.key(0))[0])
  run_local = jax.jit(local.run_round)
  for r, cohort in enumerate(cohorts):
    local_state, _ = run_local(
      local_state, jnp.asarray(cohort, jnp.int32), jax.random.key(r + 1), data
    )
  assert_trees_close(alg.local_models(state), local_state.clients.params)
  for c in range(4):
    assert not np.allclose(
      row(alg.local_models(state), c)['head']['kernel'], state.server.params['head']['kernel']
    )


def test_fedasync_proximal_term_pulls_the_update_not_the_local_model(synthetic_federation):
  """--fedasync_rho wraps `client_optimizer`; theta_local trains with `personal_optimizer`."""
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition, global_teacher_weight=1.0)
  proximal = simulator.with_proximal_client_optimizer(alg, 5.0)
  plain_state = run_rounds(alg, data, [(0, 1, 2, 3)])
  proximal_state = run_rounds(proximal, data, [(0, 1, 2, 3)])
  assert_trees_close(proximal_state.clients.local_params, plain_state.clients.local_params)
  moved = lambda s: np.abs(
    np.asarray(s.server.params['head']['kernel'])
    - alg.init(jax.random.key(0)).server.params['head']['kernel']
  ).sum()
  assert moved(proximal_state) < 0.9 * moved(plain_state)


def test_persistent_local_model_survives_rounds_it_skips(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  after_1 = run_rounds(alg, data, [(0, 1)])
  after_2 = run_rounds(alg, data, [(2, 3)], state=after_1)
  assert_trees_equal(row(after_2.clients.local_params, 0), row(after_1.clients.local_params, 0))
  # Joining again, client 0 trains on from its own local model, not the global one.
  run_round = jax.jit(alg.run_round)
  key = jax.random.key(7)
  after_3, _ = run_round(after_2, jnp.array([0, 1], jnp.int32), key, data)
  client_key = jax.random.fold_in(jax.random.split(key)[0], 0)
  expected, _ = local_training.train_client(
    row(after_2.clients.local_params, 0),
    alg.loss_fn,
    alg.client_optimizer,
    data,
    data.train_index[0],
    data.train_count[0],
    client_key,
    alg.schedule,
  )
  assert_trees_close(row(after_3.clients.local_params, 0), expected)


def test_from_global_local_model_is_the_rounds_update(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition, local_model='from_global')
  state = run_rounds(alg, data, [(1,)])
  # One client with server lr 1: the new global model is that client's trained model.
  assert_trees_close(row(state.clients.local_params, 1), state.server.params)


def test_client_that_never_trained_uses_the_global_model(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  state = run_rounds(alg, data, [(0, 1, 2)])
  local = alg.local_models(state)
  assert list(np.asarray(state.clients.has_local)) == [True, True, True, False]
  jax.tree.map(
    lambda loc, glob: np.testing.assert_array_equal(loc[3], glob), local, state.server.params
  )
  jax.tree.map(
    lambda loc, own: np.testing.assert_array_equal(loc[0], own[0]),
    local,
    state.clients.local_params,
  )


def test_round_trains_the_generator_keeps_the_memory_and_does_not_recompile(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  np.testing.assert_array_equal(state.server.seen_counts, np.zeros(4))
  new_state, metrics = run_round(state, jnp.array([0, 1], jnp.int32), jax.random.key(1), data)
  new_state, _ = run_round(new_state, jnp.array([2, 3], jnp.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1
  assert int(new_state.server.round) == 2
  np.testing.assert_array_equal(new_state.server.seen_counts, partition.train_counts.sum(0))
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b),
    state.server.generator.params,
    new_state.server.generator.params,
  )
  assert all(jax.tree.leaves(changed))
  assert bool(np.all(metrics.finite))


def test_global_teacher_only_round_does_not_recompile(synthetic_federation):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition, global_teacher_weight=1.0)
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  state, _ = run_round(state, jnp.array([0, 1], jnp.int32), jax.random.key(1), data)
  state, metrics = run_round(state, jnp.array([2, 3], jnp.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1
  assert bool(np.all(metrics.finite))


def spy_on_teachers(monkeypatch):
  """Replaces the generator's training by a recorder of the client teachers it is given."""
  seen = []

  def spy(setup, model, state, teacher_params, *args):
    seen.append(teacher_params)
    return state, {}

  monkeypatch.setattr(knowledge_transfer, 'train_on_teachers', spy)
  return seen


@pytest.mark.parametrize('client_teachers', ['local_model', 'update'])
def test_client_teachers_are_the_local_models_or_the_updates(
  monkeypatch, synthetic_federation, client_teachers
):
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition, client_teachers=client_teachers)
  assert alg.sends_local_model == (client_teachers == 'local_model')
  seen = spy_on_teachers(monkeypatch)
  # Round 1 starts every local model from the global model; in round 2 they differ.
  after_1, _ = alg.run_round(
    alg.init(jax.random.key(0)), jnp.arange(4, dtype=jnp.int32), jax.random.key(1), data
  )
  cohort = jnp.array([0, 2], jnp.int32)
  after_2, _ = alg.run_round(after_1, cohort, jax.random.key(2), data)
  teachers = seen[-1]
  locals_2 = jax.tree.map(lambda x: x[cohort], after_2.clients.local_params)
  differs = not np.allclose(teachers['head']['kernel'], locals_2['head']['kernel'])
  if client_teachers == 'local_model':
    assert_trees_equal(teachers, locals_2)
  else:
    # The updates train the global model of round 1: with server lr 1 the new global
    # model is their mean weighted by the clients' example counts.
    n = jnp.asarray(data.train_count, jnp.float32)[cohort]
    mean = jax.tree.map(lambda t: jnp.tensordot(n / n.sum(), t, 1), teachers)
    assert_trees_close(mean, after_2.server.params)
    assert differs


def test_friend_learns_a_class_no_client_holds(after_one_round):
  partition, data, state = after_one_round
  alg = make_apfl(data, partition)
  server = state.server.replace(seen_counts=jnp.array([5.0, 5.0, 5.0, 0.0]))
  only_class_3 = jnp.array([0.0, 0.0, 0.0, 1.0])
  friend = alg.train_friend(server, state.server.params, only_class_3, jax.random.key(4))
  samples = generator_lib.generate(
    alg.setup.generator,
    server.generator.params,
    jax.random.key(5),
    jnp.full((32,), 3),
    alg.setup.noise_dim,
    alg.setup.noise_distribution,
    reference_labels=jnp.array([0, 1, 2] * 8),
  )
  logits = alg.model.apply({'params': friend}, samples, method='head_logits')
  assert np.mean(np.argmax(logits, -1) == 3) > 0.9
  assert np.all(np.isfinite(logits))


def test_friend_budget_counts_the_classes_it_trains_on(after_one_round):
  partition, data, state = after_one_round
  # 40 samples per trained class, batches of 16, a 10-step scan: 4 classes take all 10
  # steps, 2 classes ceil(80 / 16) = 5.
  budget = make_apfl(data, partition, samples_per_trained_class=40)
  full = make_apfl(data, partition)
  server, start = state.server, row(budget.local_models(state), 0)
  rng = jax.random.key(5)
  every_class = jnp.array([3.0, 1.0, 2.0, 1.0])
  assert_trees_equal(
    budget.train_friend(server, start, every_class, rng),
    full.train_friend(server, start, every_class, rng),
  )
  two_classes = jnp.array([3.0, 1.0, 0.0, 0.0])
  keys = jax.random.split(rng, 10)
  five_steps = budget.friend_steps(server, start, two_classes, keys[:5], 5)
  assert_trees_equal(budget.train_friend(server, start, two_classes, rng), five_steps)
  # The masked steps change nothing: the 10-key scan stopped at 5 equals 5 keys.
  assert_trees_equal(budget.friend_steps(server, start, two_classes, keys, 5), five_steps)
  ten_steps = full.train_friend(server, start, two_classes, rng)
  assert not np.allclose(ten_steps['head']['kernel'], five_steps['head']['kernel'])


def test_label_prior_free_friends_train_on_every_class(after_one_round):
  partition, data, state = after_one_round
  alg = make_apfl(data, partition, beta=0.0)
  ids = jnp.array([3, 1], jnp.int32)
  prior_free = alg.label_prior_free_params(state, data, ids)
  assert_trees_equal(prior_free, alg.friend_models(state, ids, jnp.ones((2, 4))))
  own_labels = row(alg.personalized_params(state, data), 3)
  assert not np.allclose(row(prior_free, 0)['head']['kernel'], own_labels['head']['kernel'])
  # A client's friend does not depend on which other clients are evaluated with it.
  alone = alg.label_prior_free_params(state, data, jnp.array([3], jnp.int32))
  assert_trees_close(row(alone, 0), row(prior_free, 0))


def test_friend_label_weights_follow_friend_labels():
  counts = np.array([[6, 0, 2, 0], [0, 3, 0, 0]], np.int64)
  partition = type('P', (), {'train_counts': counts})()
  data = type('D', (), {'train_count': np.array([8, 3])})()
  probs = {
    labels: np.asarray(make_apfl(data, partition, friend_labels=labels).client_label_probs())
    for labels in ('client', 'present', 'all')
  }
  np.testing.assert_array_equal(probs['client'], counts)
  np.testing.assert_array_equal(probs['present'], [[1, 0, 1, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(probs['all'], np.ones((2, 4)))


def test_unseen_class_probe_is_finite(after_one_round):
  partition, data, state = after_one_round
  alg = make_apfl(data, partition, friend_labels='all')
  probe = alg.unseen_class_params(state, data)
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(probe))


def test_image_generator_trains_whole_friend_models():
  dataset = make_synthetic_dataset(shape=(8, 8, 1))
  partition = partition_lib.partition_dataset(
    dataset.train_labels, dataset.test_labels, num_clients=3, scheme='iid', seed=0, num_classes=4
  )
  data = client_data.build_federated_data(dataset, partition, test_multiple=8)
  setup = knowledge_transfer.create_setup(
    Config(
      generator='image',
      noise_dim=8,
      generator_steps=3,
      generator_batch_size=8,
      global_teacher_weight=1.0,
    ),
    TinyModel(),
    dataset,
    np.eye(4, dtype=np.float32),
  )
  friend = apfl_lib.FriendSetup(
    steps=3, batch_size=8, learning_rate=0.1, init='local', labels='all', beta=0.5
  )
  alg = apfl_lib.APFL(
    TinyModel(),
    (8, 8, 1),
    schedule_for(data),
    optax.sgd(0.1),
    optax.sgd(1.0),
    setup,
    friend,
    partition.train_counts,
    seed=0,
  )
  state = run_rounds(alg, data, [(0, 1, 2)])
  personalized = alg.personalized_params(state, data)
  local = alg.local_models(state)
  # Both body and head moved: the friend trained end to end on generated images.
  for part in ('body', 'head'):
    assert not np.allclose(personalized[part]['kernel'], local[part]['kernel'])
