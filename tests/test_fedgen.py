"""Tests of apfl_jax.algorithms.fedgen."""

from apfl_fixtures import make_fedgen, schedule_for
from conftest import TinyModel, assert_trees_close, run_two_rounds_compiling_once
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import create_algorithm
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.config.config import Config
from apfl_jax.core import local_training


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


def test_latent_target_of_a_one_label_batch_depends_on_the_label(synthetic_federation):
  """The KL target softmax(head(G(z, y))) of a real batch whose labels are all equal: with
  G's BatchNorm on the batch's own statistics the label's embedding was subtracted away
  (the same target for every label); a reference batch keeps it (the official code's
  eval mode). The loss difference between labels a and b is CE's plus beta_t KL's."""
  _, partition, data = synthetic_federation
  fedgen = make_fedgen(data, partition, regularizer='fedgen', beta=1.0)
  server = fedgen.init(jax.random.key(0)).server.replace(
    round=jnp.asarray(1, jnp.int32), seen_counts=jnp.ones(4)
  )
  images = data.normalize(data.train_images[:6])
  loss = jax.jit(fedgen.client_loss(server))
  model = fedgen.model

  def kl_part(label):
    labels = jnp.full((6,), label, jnp.int32)
    ce = local_training.masked_cross_entropy(
      model.apply({'params': server.params}, images), labels, jnp.ones(6)
    )
    # The teacher term does not depend on the real labels' values.
    return loss(server.params, images, labels, jnp.ones(6), jax.random.key(5)) - ce

  assert abs(float(kl_part(0) - kl_part(3))) > 1e-4


def test_label_count_prior_smooths_the_client_teacher_weights():
  """FedGen's code starts each client's label counts at 1: w_{k,y} = (n_{k,y} + 1) /
  sum_j (n_{j,y} + 1) for a label some client holds; others keep the global model's row."""
  counts = jnp.array([[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
  seen = jnp.array([4.0, 2.0, 5.0])
  weights = knowledge_transfer.memory_teacher_weights(counts, seen, 0.0, label_count_prior=1.0)
  expected = np.array([[4 / 6, 1 / 4, 0.0], [2 / 6, 3 / 4, 0.0], [0.0, 0.0, 1.0]])
  np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_client_lr_decay_scales_the_learning_rate_of_round_t(synthetic_federation):
  """--fedgen_client_lr_decay=d: a client starting in round t trains at lr d^max(t-1, 0)."""
  _, partition, data = synthetic_federation
  decayed = make_fedgen(data, partition, alpha=0.0)
  decayed.client_lr_decay = 0.5
  reference = make_fedgen(data, partition, alpha=0.0)
  reference.client_optimizer = optax.sgd(0.1 * 0.25)
  server = decayed.init(jax.random.key(0)).server.replace(round=jnp.asarray(3, jnp.int32))
  update = lambda alg: jax.jit(alg.client_update)(
    server, (), data.train_index[1], data.train_count[1], jax.random.key(1), data
  )[1]
  assert_trees_close(update(decayed).update['delta'], update(reference).update['delta'])
  config = Config(
    algorithm='fedgen',
    num_clients=4,
    fedgen_client_lr_decay=0.99,
    fedgen_teacher_ce='official',
    fedgen_label_count_prior=1.0,
  )
  dataset, _, _ = synthetic_federation
  built = create_algorithm(config, TinyModel(), dataset, partition, schedule_for(data))
  assert built.client_lr_decay == 0.99
  assert (built.setup.ce_weighting, built.setup.label_count_prior) == ('official', 1.0)
