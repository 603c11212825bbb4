"""Tests of apfl_jax.algorithms.knowledge_transfer."""

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax import generator as generator_lib
from apfl_jax.algorithms import knowledge_transfer
from apfl_fixtures import generator_setup
from conftest import TinyModel


def test_client_label_counts_match_the_partition(synthetic_federation):
  _, partition, data = synthetic_federation
  for c in range(data.num_clients):
    counts = knowledge_transfer.client_label_counts(data, data.train_index[c],
                                                    data.train_count[c], 4)
    np.testing.assert_array_equal(counts, partition.train_counts[c])


def test_global_teacher_shares_every_held_label(monkeypatch):
  setup = generator_setup(global_teacher_weight=0.25)
  model = TinyModel()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))['params']
  teachers = jax.tree.map(lambda x: jnp.stack([x, x]), params)
  seen = {}

  def spy(generator, state, optimizer, teacher_logits_fn, label_probs, weights, rng, **kw):
    seen['weights'], seen['probs'] = weights, label_probs
    seen['logits'] = teacher_logits_fn(jnp.zeros((3, model.feature_dim)))
    return state, {}

  monkeypatch.setattr(generator_lib, 'train_generator', spy)
  counts = jnp.array([[3.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0]])
  knowledge_transfer.train_on_teachers(setup, model, None, teachers, counts, params,
                                       jax.random.key(1))
  weights = np.asarray(seen['weights'])
  assert weights.shape == (3, 4) and seen['logits'].shape == (3, 3, 4)
  np.testing.assert_allclose(weights.sum(0), [1.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(weights[2], [0.25, 0.25, 0.0, 0.25])
  np.testing.assert_allclose(weights[0], [0.75 * 3 / 4, 0.75, 0.0, 0.0])
  np.testing.assert_array_equal(seen['probs'], [1.0, 1.0, 0.0, 1.0])
