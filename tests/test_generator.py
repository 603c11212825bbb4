"""Tests for apfl_jax.algorithms.generative.generator (small shapes; CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apfl_jax.algorithms.generative import generator as gen_lib
from apfl_jax.core.errors import ConfigError

NUM_CLASSES = 5
EMBED_DIM = 8
NOISE_DIM = 4
FEATURE_DIM = 16
# Teachers hold classes 0-3; nobody holds class 4 (the zero-shot class).
COUNTS = np.array([[6, 0, 2, 1, 0], [2, 5, 0, 3, 0]], np.float32)
UNHELD = 4


def _table() -> np.ndarray:
  rng = np.random.default_rng(0)
  table = rng.normal(size=(NUM_CLASSES, EMBED_DIM)).astype(np.float32)
  return table / np.linalg.norm(table, axis=1, keepdims=True)


def _feature_generator() -> gen_lib.FeatureGenerator:
  return gen_lib.create_generator(
    'feature', _table(), NOISE_DIM, 32, FEATURE_DIM, (28, 28, 1), (0.5,), (0.25,)
  )


def test_diversity_loss_two_samples_by_hand():
  noise = jnp.array([[0.0, 0.0], [1.0, 2.0]])
  outputs = jnp.array([[[0.0, 0.0, 0.0]], [[1.0, -1.0, 4.0]]])  # [2, 1, 3], flattened.
  # d_z(0,1) = (1^2 + 2^2)/2 = 2.5; d_G(0,1) = (1 + 1 + 4)/3 = 2.
  # Pairs (0,0),(0,1),(1,0),(1,1): products 0, 5, 5, 0 -> mean 2.5.
  np.testing.assert_allclose(gen_lib.diversity_loss(noise, outputs), math.exp(-2.5), rtol=1e-6)


def test_diversity_loss_three_samples_by_hand():
  noise = jnp.array([[0.0], [1.0], [3.0]])
  outputs = jnp.array([[0.0], [2.0], [2.0]])
  # d_z: (0,1)=1, (0,2)=9, (1,2)=4; d_G: (0,1)=2, (0,2)=2, (1,2)=0.
  # Products 2, 18, 0, each twice (ordered pairs), diagonal 0: 40 / 9 pairs.
  np.testing.assert_allclose(
    gen_lib.diversity_loss(noise, outputs), math.exp(-40.0 / 9.0), rtol=1e-6
  )


def test_diversity_loss_same_label_pairs_by_hand():
  noise = jnp.array([[0.0], [1.0], [3.0]])
  outputs = jnp.array([[0.0], [2.0], [2.0]])
  # Labels 0, 0, 1: same-label ordered pairs (0,0), (0,1), (1,0), (1,1), (2,2);
  # only (0,1) and (1,0) have nonzero products, d_z d_G = 1 * 2: 4 / 5 pairs.
  np.testing.assert_allclose(
    gen_lib.diversity_loss(noise, outputs, jnp.array([0, 0, 1])), math.exp(-4.0 / 5.0), rtol=1e-6
  )


def test_teacher_weights():
  weights = np.asarray(gen_lib.teacher_weights(COUNTS))
  assert weights.shape == COUNTS.shape
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights[:, 0], [0.75, 0.25])
  np.testing.assert_allclose(weights.sum(0)[:UNHELD], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(weights[:, UNHELD], 0.0)


def test_teacher_cross_entropy_by_hand():
  # Teacher 0: zero logits, CE = log 2 for either label.
  # Teacher 1: logits [0, log 3] -> p = [1/4, 3/4]: CE(y=0) = log 4,
  # CE(y=1) = log(4/3).
  logits = jnp.array([[[0.0, 0.0], [0.0, 0.0]], [[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
  labels = jnp.array([0, 1])
  weights = jnp.array([[1.0, 0.25], [0.0, 0.75]])
  # Sample 0 (y=0): 1*log2 + 0*log4. Sample 1 (y=1): 0.25*log2 + 0.75*log(4/3).
  expected = (math.log(2.0) + 0.25 * math.log(2.0) + 0.75 * math.log(4.0 / 3.0)) / 2
  np.testing.assert_allclose(
    gen_lib.teacher_cross_entropy(logits, labels, weights), expected, rtol=1e-6
  )


@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3)])
def test_image_generator_shapes_and_range(image_shape):
  channels = image_shape[-1]
  mean, std = (0.5,) * channels, (0.25,) * channels
  generator = gen_lib.create_generator('image', _table(), NOISE_DIM, 0, 0, image_shape, mean, std)
  state = gen_lib.init_generator(generator, optax.adam(1e-4), jax.random.key(0))
  assert set(
    jax.eval_shape(
      generator.init, jax.random.key(0), jnp.zeros((2, NOISE_DIM)), jnp.zeros((2,), jnp.int32)
    )
  ) == {'params'}
  images = gen_lib.generate(
    generator, state.params, jax.random.key(1), jnp.arange(4) % NUM_CLASSES, NOISE_DIM, 'uniform'
  )
  assert images.shape == (4, *image_shape)
  # Pixels in [0, 1] standardised with mean 0.5, std 0.25 lie in [-2, 2].
  assert float(images.min()) >= -2.0 - 1e-5 and float(images.max()) <= 2.0 + 1e-5


def test_feature_generator_shape_params_only_and_pure():
  generator = _feature_generator()
  variables = generator.init(
    jax.random.key(0), jnp.zeros((2, NOISE_DIM)), jnp.zeros((2,), jnp.int32)
  )
  assert set(variables) == {'params'}
  noise = gen_lib.sample_noise(jax.random.key(1), 6, NOISE_DIM, 'normal')
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  out1 = generator.apply(variables, noise, labels)
  out2 = generator.apply({'params': variables['params']}, noise, labels)
  assert out1.shape == (6, FEATURE_DIM)
  np.testing.assert_array_equal(out1, out2)


@pytest.mark.parametrize('kind', gen_lib.GENERATORS)
def test_zero_shot_class_is_finite_and_distinct(kind):
  generator = gen_lib.create_generator(
    kind, _table(), NOISE_DIM, 32, FEATURE_DIM, (28, 28, 1), (0.5,), (0.25,)
  )
  params = gen_lib.init_generator(generator, optax.adam(1e-4), jax.random.key(0)).params
  weights = gen_lib.teacher_weights(COUNTS)
  assert np.all(np.asarray(weights[:, UNHELD]) == 0)
  sample = functools.partial(
    gen_lib.generate,
    generator,
    params,
    jax.random.key(3),
    noise_dim=NOISE_DIM,
    noise_distribution='uniform',
    reference_labels=jnp.arange(NUM_CLASSES),
  )
  unheld = sample(jnp.full((4,), UNHELD))
  held = sample(jnp.zeros((4,), jnp.int32))
  assert np.all(np.isfinite(unheld))
  assert float(jnp.max(jnp.abs(unheld - held))) > 1e-3


def test_single_class_batch_without_reference_loses_the_class():
  # The documented pitfall that `reference_labels` exists for: with batch
  # statistics, a constant condition row is subtracted by the first BatchNorm.
  generator = _feature_generator()
  params = gen_lib.init_generator(generator, optax.adam(1e-4), jax.random.key(0)).params
  sample = functools.partial(
    gen_lib.generate,
    generator,
    params,
    jax.random.key(3),
    noise_dim=NOISE_DIM,
    noise_distribution='uniform',
  )
  np.testing.assert_allclose(
    sample(jnp.full((4,), UNHELD)), sample(jnp.zeros((4,), jnp.int32)), atol=1e-4
  )


def test_sample_noise_distributions():
  uniform = gen_lib.sample_noise(jax.random.key(0), 256, NOISE_DIM, 'uniform')
  assert float(uniform.min()) >= 0.0 and float(uniform.max()) < 1.0
  normal = gen_lib.sample_noise(jax.random.key(0), 256, NOISE_DIM, 'normal')
  assert float(normal.min()) < 0.0
  with pytest.raises(ConfigError):
    gen_lib.sample_noise(jax.random.key(0), 2, NOISE_DIM, 'laplace')
  with pytest.raises(ConfigError):
    gen_lib.create_generator('vae', _table(), NOISE_DIM, 8, 8, (28, 28, 1), (0.5,), (0.25,))


def _linear_teacher(seed: int = 0) -> jnp.ndarray:
  """A fixed random linear head [FEATURE_DIM, NUM_CLASSES]."""
  return jax.random.normal(jax.random.key(seed), (FEATURE_DIM, NUM_CLASSES)) / 4.0


def test_train_generator_lowers_teacher_ce():
  generator = _feature_generator()
  optimizer = optax.adam(1e-3)
  state = gen_lib.init_generator(generator, optimizer, jax.random.key(0))
  head = _linear_teacher()
  teacher_fn = lambda x: (x @ head)[None]  # K = 1.
  weights = gen_lib.teacher_weights(np.array([[4.0, 3.0, 2.0, 1.0, 0.0]]))
  label_probs = jnp.array([0.4, 0.3, 0.2, 0.1, 0.0])
  eval_labels = jnp.tile(jnp.arange(4), 16)

  def eval_ce(params):
    samples = gen_lib.generate(
      generator, params, jax.random.key(99), eval_labels, NOISE_DIM, 'uniform'
    )
    return float(gen_lib.teacher_cross_entropy(teacher_fn(samples), eval_labels, weights))

  train = jax.jit(
    functools.partial(
      gen_lib.train_generator,
      generator,
      optimizer=optimizer,
      teacher_logits_fn=teacher_fn,
      num_steps=100,
      batch_size=32,
      ce_weight=0.9,
      noise_dim=NOISE_DIM,
      noise_distribution='uniform',
    )
  )
  before = eval_ce(state.params)
  new_state, metrics = train(state, label_probs=label_probs, weights=weights, rng=jax.random.key(1))
  after = eval_ce(new_state.params)
  assert set(metrics) == {'loss', 'ce', 'diversity'}
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert 0.0 < float(metrics['diversity']) <= 1.0
  assert after < 0.5 * before, (before, after)


def test_train_generator_jit_does_not_recompile():
  generator = _feature_generator()
  optimizer = optax.adam(3e-4)
  traces = []

  @jax.jit
  def server_step(state, stacked_heads, weights, rng):
    def teacher_fn(x):
      traces.append(1)  # Runs once per trace, not per call.
      return jax.vmap(lambda w: x @ w)(stacked_heads)  # [K, B, C].

    return gen_lib.train_generator(
      generator,
      state,
      optimizer,
      teacher_fn,
      jnp.ones(NUM_CLASSES),
      weights,
      rng,
      num_steps=3,
      batch_size=8,
      ce_weight=0.5,
      noise_dim=NOISE_DIM,
      noise_distribution='uniform',
    )

  weights = gen_lib.teacher_weights(COUNTS)
  heads = jnp.stack([_linear_teacher(0), _linear_teacher(1)])
  state = gen_lib.init_generator(generator, optimizer, jax.random.key(0))
  state, _ = server_step(state, heads, weights, jax.random.key(1))
  n_traces = len(traces)
  state, metrics = server_step(state, heads + 1.0, weights, jax.random.key(2))
  assert len(traces) == n_traces
  assert np.isfinite(float(metrics['ce']))


def test_noise_dim_mismatch_raises():
  generator = _feature_generator()
  params = gen_lib.init_generator(generator, optax.adam(1e-4), jax.random.key(0)).params
  with pytest.raises(ConfigError):
    gen_lib.generate(
      generator, params, jax.random.key(0), jnp.zeros(2, jnp.int32), NOISE_DIM + 1, 'uniform'
    )
