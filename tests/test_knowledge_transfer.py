"""Tests of apfl_jax.algorithms.generative.knowledge_transfer."""

from apfl_fixtures import generator_setup
from conftest import TinyModel
import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer


def test_client_label_counts_match_the_partition(synthetic_federation):
  _, partition, data = synthetic_federation
  for c in range(data.num_clients):
    counts = knowledge_transfer.client_label_counts(
      data, data.train_index[c], data.train_count[c], 4
    )
    np.testing.assert_array_equal(counts, partition.train_counts[c])


def spy_on_generator_training(monkeypatch, model):
  """Replaces train_generator by a recorder of its weights, label probs and logits."""
  seen = {}

  def spy(generator, state, optimizer, teacher_logits_fn, label_probs, weights, rng, **kw):
    seen['weights'], seen['probs'] = weights, label_probs
    seen['logits'] = teacher_logits_fn(jnp.zeros((3, model.feature_dim)))
    return state, {}

  monkeypatch.setattr(generator_lib, 'train_generator', spy)
  return seen


def test_global_teacher_shares_every_held_label(monkeypatch):
  setup = generator_setup(global_teacher_weight=0.25)
  model = TinyModel()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))['params']
  teachers = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  seen = spy_on_generator_training(monkeypatch, model)
  counts = jnp.array([[3.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
  # The memory also holds label 2, learned in an earlier round: only the global model
  # can teach it now.
  memory = jnp.array([9.0, 1.0, 5.0, 2.0])
  knowledge_transfer.train_on_teachers(
    setup, model, None, teachers, counts, params, memory, jax.random.key(1)
  )
  weights = np.asarray(seen['weights'])
  assert weights.shape == (3, 4) and seen['logits'].shape == (3, 3, 4)
  np.testing.assert_allclose(weights.sum(0), [1.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(weights[2], [0.25, 0.25, 1.0, 0.25])
  np.testing.assert_allclose(weights[0], [0.75 * 3 / 4, 0.75, 0.0, 0.0])
  np.testing.assert_allclose(weights[1], [0.75 * 1 / 4, 0.0, 0.0, 0.75])
  np.testing.assert_array_equal(seen['probs'], [1.0, 1.0, 1.0, 1.0])


def test_global_model_alone_teaches_the_memory(monkeypatch):
  setup = generator_setup(global_teacher_weight=1.0)
  model = TinyModel()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))['params']
  seen = spy_on_generator_training(monkeypatch, model)
  counts = jnp.array([[3.0, 0.0, 0.0, 0.0]])
  knowledge_transfer.train_on_teachers(
    setup, model, None, None, counts, params, jnp.array([3.0, 4.0, 0.0, 0.0]), jax.random.key(1)
  )
  np.testing.assert_array_equal(seen['weights'], [[1.0, 1.0, 0.0, 0.0]])
  np.testing.assert_array_equal(seen['probs'], [1.0, 1.0, 0.0, 0.0])
  assert seen['logits'].shape == (1, 3, 4)


def test_memory_label_probs_is_uniform_over_seen_classes():
  np.testing.assert_array_equal(
    knowledge_transfer.memory_label_probs(jnp.array([0.0, 7.0, 1.0])), [0.0, 1.0, 1.0]
  )
  np.testing.assert_array_equal(
    knowledge_transfer.memory_label_probs(jnp.zeros((3,))), [1.0, 1.0, 1.0]
  )
