"""Tests of apfl_jax.core.local_training: masking, step counts, vmap = sequential."""

from conftest import TinyModel
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apfl_jax.algorithms import base
from apfl_jax.core import local_training


def schedule_for(data, batch_size=8, epochs=1, steps=0):
  counts = np.asarray(data.train_count)
  return local_training.Schedule.create(
    batch_size, epochs, steps, int(counts.min()), int(counts.max())
  )


@pytest.mark.parametrize('epochs,steps', [(2, 0), (0, 7)])
def test_batch_plan_visits_each_example_once_per_epoch(epochs, steps):
  count, batch = 13, 4
  schedule = local_training.Schedule.create(batch, epochs, steps, 5, 30)
  positions, example_mask, step_mask = jax.device_get(
    local_training.batch_plan(jax.random.key(0), jnp.asarray(count), schedule)
  )
  expected_steps = steps if steps else epochs * 4
  assert step_mask.sum() == expected_steps
  valid = positions[step_mask][example_mask[step_mask] > 0]
  if steps == 0:
    assert len(valid) == epochs * count
    for e in range(epochs):
      np.testing.assert_array_equal(np.sort(valid[e * count : (e + 1) * count]), np.arange(count))
  assert valid.max() < count


def test_padding_does_not_change_training(synthetic_federation):
  _, _, data = synthetic_federation
  model = TinyModel()
  params = base.init_model_params(model, jax.random.key(1), (6, 6, 1))
  loss_fn = base.classification_loss(model)
  opt = optax.sgd(0.1)
  row, count = data.train_index[0], data.train_count[0]
  wide = jnp.concatenate([row, jnp.zeros((37,), jnp.int32)])
  small_schedule = schedule_for(data)
  wide_schedule = local_training.Schedule.create(
    8, 1, 0, small_schedule.batch_size, int(wide.shape[0])
  )
  a, loss_a = local_training.train_client(
    params, loss_fn, opt, data, row, count, jax.random.key(2), small_schedule
  )
  b, loss_b = local_training.train_client(
    params, loss_fn, opt, data, wide, count, jax.random.key(2), wide_schedule
  )
  assert wide_schedule.num_steps > small_schedule.num_steps
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)


def test_vmapped_clients_equal_sequential_clients(synthetic_federation):
  _, _, data = synthetic_federation
  model = TinyModel()
  params = base.init_model_params(model, jax.random.key(1), (6, 6, 1))
  loss_fn = base.classification_loss(model)
  opt = optax.sgd(0.1, momentum=0.9)
  schedule = schedule_for(data, epochs=2)
  keys = jax.random.split(jax.random.key(3), data.num_clients)

  train = lambda row, count, key: local_training.train_client(
    params, loss_fn, opt, data, row, count, key, schedule
  )
  stacked, _ = jax.jit(jax.vmap(train))(data.train_index, data.train_count, keys)
  for c in range(data.num_clients):
    single, _ = jax.jit(train)(data.train_index[c], data.train_count[c], keys[c])
    jax.tree.map(
      lambda s, x: np.testing.assert_allclose(s[c], x, rtol=1e-5, atol=1e-6), stacked, single
    )


def test_training_lowers_the_loss(synthetic_federation):
  _, _, data = synthetic_federation
  model = TinyModel()
  params = base.init_model_params(model, jax.random.key(1), (6, 6, 1))
  loss_fn = base.classification_loss(model)
  schedule = schedule_for(data, epochs=5)
  row, count = data.train_index[1], data.train_count[1]
  images = data.normalize(data.train_images[row[: int(count)]])
  labels = data.train_labels[row[: int(count)]]
  mask = jnp.ones(labels.shape)
  before = loss_fn(params, images, labels, mask, None)
  trained, _ = local_training.train_client(
    params, loss_fn, optax.sgd(0.1), data, row, count, jax.random.key(0), schedule
  )
  assert loss_fn(trained, images, labels, mask, None) < 0.5 * before


def test_masked_cross_entropy_ignores_masked_examples():
  logits = jnp.array([[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]])
  labels = jnp.array([0, 0, 1])
  full = local_training.masked_cross_entropy(logits[:2], labels[:2], jnp.ones(2))
  masked = local_training.masked_cross_entropy(logits, labels, jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(full, masked, rtol=1e-6)


@pytest.mark.parametrize('max_buckets', [2, 3, 4])
def test_buckets_cover_any_cohort_and_bound_each_member(max_buckets):
  rng = np.random.default_rng(max_buckets)
  counts = rng.integers(5, 400, size=12)
  schedule = local_training.Schedule.create(
    10,
    2,
    0,
    int(counts.min()),
    int(counts.max()),
    client_counts=tuple(counts),
    max_buckets=max_buckets,
  )
  for cohort_size in (1, 5, 12):
    buckets = schedule.buckets(cohort_size)
    assert 1 <= len(buckets) <= max_buckets
    assert [b[0] for b in buckets] == [0] + [b[1] for b in buckets[:-1]]
    assert buckets[-1][1] == cohort_size
    scanned = sum((end - start) * s.num_steps for start, end, s in buckets)
    assert scanned <= cohort_size * schedule.num_steps
    for _ in range(20):  # whichever clients form the cohort, no member is cut short
      cohort = np.sort(rng.choice(counts, cohort_size, replace=False))[::-1]
      for start, end, s in buckets:
        assert all(schedule.steps_for(int(c)) <= s.num_steps for c in cohort[start:end])
        assert all(c <= s.padded_len for c in cohort[start:end])


def test_uneven_clients_scan_fewer_steps_in_buckets():
  # Training examples of the 20 clients of a Dirichlet(0.1) split of Fashion-MNIST.
  counts = np.array(
    [
      414,
      581,
      641,
      729,
      1181,
      1235,
      1548,
      1700,
      2553,
      2633,
      2854,
      2869,
      3104,
      3134,
      3310,
      3548,
      4386,
      4785,
      5502,
      5786,
    ]
  )
  schedule = local_training.Schedule.create(
    10, 1, 0, 414, 5786, client_counts=tuple(counts), max_buckets=4
  )
  scanned = sum((end - start) * s.num_steps for start, end, s in schedule.buckets(20))
  assert scanned < 0.55 * 20 * schedule.num_steps


@pytest.mark.parametrize('epochs,steps,counts', [(0, 20, (30, 300)), (1, 0, (50, 50, 50))])
def test_fixed_steps_or_equal_clients_keep_one_lockstep_scan(epochs, steps, counts):
  schedule = local_training.Schedule.create(
    10, epochs, steps, min(counts), max(counts), client_counts=counts, max_buckets=4
  )
  assert schedule.buckets(len(counts)) == ((0, len(counts), schedule),)


@pytest.mark.parametrize('name', local_training.OPTIMIZERS)
def test_an_optimizer_steps_as_its_optax_transformation(name):
  """`Optimizer` builds optax's optimizer from its fields: two steps by hand (NumPy) for
  SGD and momentum, optax's own Adam for adam; an unknown name is refused."""
  params = {'w': jnp.array([1.0, -2.0])}
  grads = [{'w': jnp.array([0.5, 1.0])}, {'w': jnp.array([-1.0, 0.25])}]
  optimizer = local_training.make_optimizer(name, 0.1)
  reference = optax.adam(0.1) if name == 'adam' else None
  state = optimizer.init(params)
  ref_state = reference.init(params) if reference else None
  w, velocity = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)
    if reference:
      ref_updates, ref_state = reference.update(g, ref_state)
      w = w + np.asarray(ref_updates['w'])
    else:
      velocity = np.asarray(g['w']) + (0.9 * velocity if name == 'momentum' else 0.0)
      w = w - 0.1 * velocity
  np.testing.assert_allclose(params['w'], w, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
    local_training.make_optimizer('lamb', 0.1)
