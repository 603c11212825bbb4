"""Golden tests of AP-FL with its defaults (image generator, whole-model friends), its
zero-shot and label-prior-free probes, and one asynchronous AP-FL server step.

Every reference is float64 NumPy written from the paper's formulas, independent of the
project's functions: the image generator's forward pass (Dense - BatchNorm - ReLU - two
ConvTranspose(4x4, stride 2, SAME) - tanh, pixels standardised), the generator loss
L_G = lambda CE(global(G(z, A(y))), y) + (1 - lambda) exp(-mean_ij d_z d_G) and its
gradient by central finite differences, and the friend's SGD on generated images. Only
the random draws (labels, noise) are taken from JAX's keys, drawn as the project draws
them. The problem is test_golden's linear model, on 3 clients of 4x4x1 images.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_golden import (
  COUNTS,
  LR,
  NUM_CLASSES,
  LinearModel,
  assert_close,
  async_config,
  ce_grad,
  local_sgd,
  logits_of,
  schedule,
  softmax,
  tiny_data,
  to_numpy,
  tree_axpy,
  weighted,
)

from apfl_jax.algorithms.apfl import APFL, FriendSetup
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.asynchrony import simulator
from apfl_jax.config.config import Config

SHAPE = (4, 4, 1)
NOISE_DIM = 2
GEN_BATCH = 4
LAMBDA = 0.5
GEN_LR = 1.0  # generator SGD: new - old = -gradient
TABLE = np.eye(NUM_CLASSES)  # A(c): one-hot codes (the embedding is not under test)
FRIEND = FriendSetup(
  steps=2, batch_size=4, learning_rate=0.3, init='local', labels='client', beta=0.25
)


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def tiny_images():
  """(FederatedData, per-client float64 inputs [n, 16], per-client labels, label counts)."""
  data, xs, ys = tiny_data(SHAPE, seed=1)
  counts = np.stack([np.bincount(y, minlength=NUM_CLASSES) for y in ys]).astype(np.float32)
  return data, xs, ys, counts


def make_apfl(counts):
  """AP-FL's defaults: image generator taught by the global model alone (g = 1)."""
  config = Config(
    generator='image',
    noise_dim=NOISE_DIM,
    generator_batch_size=GEN_BATCH,
    generator_steps=1,
    generator_ce_weight=LAMBDA,
    global_teacher_weight=1.0,
  )
  dataset = type('D', (), {'image_shape': SHAPE, 'mean': np.array([0.5]), 'std': np.array([0.25])})
  setup = knowledge_transfer.create_setup(
    config, LinearModel(), dataset(), TABLE.astype(np.float32)
  )
  setup = dataclasses.replace(setup, optimizer=optax.sgd(GEN_LR))
  return APFL(
    LinearModel(), SHAPE, schedule(), optax.sgd(LR), optax.sgd(1.0), setup, FRIEND, counts, 0
  )


# ---------------------------------------------------------------- NumPy reference


def batch_norm(x, p, mask):
  """(x - mu) / sqrt(var + 1e-5) * scale + bias, mu and the biased var over the rows of
  `mask` (and space)."""
  axes = tuple(range(x.ndim - 1))
  w = mask.reshape((-1,) + (1,) * (x.ndim - 1)) * np.ones(x.shape[:-1] + (1,))
  mean = (w * x).sum(axes) / w.sum()
  var = (w * (x - mean) ** 2).sum(axes) / w.sum()
  return (x - mean) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def conv_transpose(x, p, stride=2, size=4):
  """A transposed convolution, SAME: the input dilated by the stride, padded by 2 on each
  side and correlated with the (unflipped) 4x4 kernel, plus the bias."""
  n, h, w, c = x.shape
  dilated = np.zeros((n, (h - 1) * stride + 1, (w - 1) * stride + 1, c))
  dilated[:, ::stride, ::stride] = x
  padded = np.pad(dilated, ((0, 0), (2, 2), (2, 2), (0, 0)))
  out = np.zeros((n, h * stride, w * stride, p['kernel'].shape[-1]))
  for i in range(h * stride):
    for j in range(w * stride):
      window = padded[:, i : i + size, j : j + size]
      out[:, i, j] = np.einsum('nabc,abco->no', window, p['kernel'])
  return out + p['bias']


def generate(p, z, y, mask=None):
  """The image generator G(z, A(y)), flattened [B, 16]; BatchNorm statistics from the
  rows of `mask` (all rows by default)."""
  mask = np.ones(len(y)) if mask is None else mask
  x = np.concatenate([z, TABLE[y]], -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  x = np.maximum(batch_norm(x, p['BatchStatsNorm_0'], mask), 0.0)
  x = x.reshape(x.shape[0], 1, 1, -1)
  x = conv_transpose(x, p['ConvTranspose_0'])
  x = np.maximum(batch_norm(x, p['BatchStatsNorm_1'], mask), 0.0)
  x = conv_transpose(x, p['ConvTranspose_1'])
  pixels = (np.tanh(x) + 1.0) / 2.0
  return ((pixels - 0.5) / 0.25).reshape(len(y), -1)


def generator_loss(p, teacher, z, y):
  """L_G with the global model as the only teacher (weight 1 on every memorized label)."""
  g = generate(p, z, y)
  log_p = np.log(softmax(logits_of(teacher, g)))
  ce = -np.mean(log_p[np.arange(len(y)), y])
  d_z = np.mean((z[:, None] - z[None]) ** 2, -1)
  d_g = np.mean(np.abs(g[:, None] - g[None]), -1)
  return LAMBDA * ce + (1 - LAMBDA) * np.exp(-np.mean(d_z * d_g))


# Generator coordinates whose gradient is checked (Dense_0's bias feeds a batch-statistics
# BatchNorm: its gradient is 0).
COORDINATES = [
  ('Dense_0', 'kernel', (0, 3)),
  ('Dense_0', 'kernel', (4, 100)),
  ('BatchStatsNorm_0', 'scale', (7,)),
  ('BatchStatsNorm_0', 'bias', (50,)),
  ('ConvTranspose_0', 'kernel', (1, 2, 5, 9)),
  ('ConvTranspose_0', 'kernel', (2, 2, 127, 63)),
  ('ConvTranspose_0', 'bias', (4,)),
  ('BatchStatsNorm_1', 'scale', (3,)),
  ('BatchStatsNorm_1', 'bias', (30,)),
  ('ConvTranspose_1', 'kernel', (0, 1, 2, 0)),
  ('ConvTranspose_1', 'kernel', (3, 3, 40, 0)),
  ('ConvTranspose_1', 'bias', (0,)),
]


def assert_one_generator_sgd_step(before, after, teacher, rng, memorized):
  """after = before - GEN_LR * grad L_G at the batch train_generator draws from `rng`
  (labels uniform over the memorized classes, z ~ U[0, 1)), on COORDINATES; the gradient
  by central differences of the float64 loss."""
  label_key, noise_key = jax.random.split(jax.random.split(rng, 1)[0])
  y = np.asarray(jax.random.categorical(label_key, jnp.log(memorized), shape=(GEN_BATCH,)))
  z = np.asarray(jax.random.uniform(noise_key, (GEN_BATCH, NOISE_DIM)), np.float64)
  p, teacher = to_numpy(before), to_numpy(teacher)
  checked = 0
  for layer, name, index in COORDINATES:
    eps = 1e-5
    plus = jax.tree.map(np.copy, p)
    minus = jax.tree.map(np.copy, p)
    plus[layer][name][index] += eps
    minus[layer][name][index] -= eps
    gradient = (generator_loss(plus, teacher, z, y) - generator_loss(minus, teacher, z, y)) / (
      2 * eps
    )
    step = float(np.asarray(before[layer][name], np.float64)[index]) - float(
      np.asarray(after[layer][name], np.float64)[index]
    )
    np.testing.assert_allclose(step, GEN_LR * gradient, rtol=2e-3, atol=2e-6)
    checked += abs(gradient) > 1e-4
  assert checked >= 6  # the checked gradients are not all ~0


def friend(server, start, label_probs, key, memory):
  """A whole-model friend: FRIEND.steps SGD steps from `start` on generated images only,
  labels drawn from `label_probs`, BatchNorm statistics from a reference batch drawn from
  the memory (with its own noise), as train_friend draws them."""
  p_gen = to_numpy(server.generator.params)
  theta = to_numpy(start)
  for step_key in jax.random.split(key, FRIEND.steps):
    label_key, reference_key, sample_key = jax.random.split(step_key, 3)
    y = np.asarray(
      jax.random.categorical(label_key, jnp.log(label_probs), shape=(FRIEND.batch_size,))
    )
    reference = np.asarray(jax.random.categorical(reference_key, memory, shape=(GEN_BATCH,)))
    noise_key, reference_noise_key = jax.random.split(sample_key)
    z = np.asarray(jax.random.uniform(noise_key, (FRIEND.batch_size, NOISE_DIM)), np.float64)
    z_ref = np.asarray(jax.random.uniform(reference_noise_key, (GEN_BATCH, NOISE_DIM)), np.float64)
    mask = np.concatenate([np.zeros(len(y)), np.ones(len(reference))])
    images = generate(p_gen, np.concatenate([z, z_ref]), np.concatenate([y, reference]), mask)
    theta = tree_axpy(-FRIEND.learning_rate, ce_grad(theta, images[: len(y)], y), theta)
  return theta


def memory_logits(server):
  seen = np.asarray(server.seen_counts)
  return jnp.log(jnp.asarray(seen > 0, jnp.float32))


# ---------------------------------------------------------------- synchronous AP-FL


@pytest.fixture(scope='module')
def one_round():
  """AP-FL after one round of all 3 clients, and its NumPy inputs."""
  data, xs, ys, counts = tiny_images()
  alg = make_apfl(counts)
  before = alg.init(jax.random.key(0))
  after, _ = jax.jit(alg.run_round)(before, jnp.arange(3, dtype=jnp.int32), jax.random.key(1), data)
  return alg, data, xs, ys, counts, before, after


@pytest.mark.slow
def test_apfl_round_trains_the_image_generator_under_global_model_supervision(one_round):
  """w1 = sum_k n_k w_k / sum_k n_k (each w_k: 2 SGD steps of the global model on client
  k); the memory sums the label counts; the generator takes one SGD step on L_G with w1,
  the new global model, as the only teacher."""
  alg, _, xs, ys, counts, before, after = one_round
  w0 = to_numpy(before.server.params)
  trained = [local_sgd(w0, lambda p, c=c: ce_grad(p, xs[c], ys[c])) for c in range(3)]
  w1 = weighted(trained, np.array(COUNTS) / sum(COUNTS))
  assert_close(after.server.params, w1)
  np.testing.assert_allclose(after.server.seen_counts, counts.sum(0))
  assert_one_generator_sgd_step(
    before.server.generator.params,
    after.server.generator.params,
    w1,
    jax.random.split(jax.random.key(1))[1],
    jnp.ones(NUM_CLASSES),
  )


def test_apfl_whole_model_friends_and_interpolation(one_round):
  """Client k's friend starts from theta_local (= its trained global copy in round 1) and
  takes 2 SGD steps on every layer with CE(f(G(z, A(y))), y), y from k's label mix;
  theta_p = beta theta_local + (1 - beta) theta_friend."""
  alg, data, xs, ys, counts, before, after = one_round
  w0 = to_numpy(before.server.params)
  personalized = alg.personalized_params(after, data)
  keys = alg.friend_keys(after.server)
  for c in range(3):
    local = local_sgd(w0, lambda p, c=c: ce_grad(p, xs[c], ys[c]))
    theta_friend = friend(after.server, local, counts[c], keys[c], memory_logits(after.server))
    assert not np.allclose(theta_friend['body']['kernel'], local['body']['kernel'])
    expected = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, local, theta_friend)
    assert_close(jax.tree.map(lambda a, c=c: a[c], personalized), expected)


def test_apfl_dropout_probes(one_round):
  """The zero-shot probe: the global model trained like a friend on every class uniformly
  (the probe's own key); the label-prior-free model of client 1: beta theta_local +
  (1 - beta) friend trained on every class uniformly (client 1's key)."""
  alg, data, xs, ys, counts, before, after = one_round
  server = after.server
  keys = alg.friend_keys(server)
  uniform = np.ones(NUM_CLASSES, np.float32)
  probe = friend(server, to_numpy(server.params), uniform, keys[3], memory_logits(server))
  assert_close(alg.unseen_class_params(after, data), probe)
  local = local_sgd(to_numpy(before.server.params), lambda p: ce_grad(p, xs[1], ys[1]))
  theta_friend = friend(server, local, uniform, keys[1], memory_logits(server))
  prior_free = alg.label_prior_free_params(after, data, jnp.array([1], jnp.int32))
  expected = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, local, theta_friend)
  assert_close(jax.tree.map(lambda a: a[0], prior_free), expected)


# ---------------------------------------------------------------- asynchronous AP-FL


@pytest.mark.slow
def test_apfl_fedbuff_server_step():
  """FedBuff, K = 2, server sgd(eta): clients 0 and 1 arrive first (tau 0):
  w1 = w0 + eta (1/2) sum_k s(0) delta_k; memory = n_0 + n_1; one generator step with w1
  as the teacher; theta_local of clients 0 and 1 = their trained copies."""
  data, xs, ys, counts = tiny_images()
  eta = 0.7
  alg = make_apfl(counts)
  alg.server_optimizer = optax.sgd(eta)
  sim = simulator.AsyncSimulator(
    alg,
    async_config(server='fedbuff', buffer_size=2, staleness_function='polynomial'),
    3,
    np.ones(3),
  )
  init = alg.init(jax.random.key(0))
  rng = jax.random.key(4)
  state, metrics = sim.server_step(sim.init(init), rng, data)
  assert metrics['clients'] == [0, 1] and metrics['staleness'] == [0, 0]
  w0 = to_numpy(init.server.params)
  trained = [local_sgd(w0, lambda p, c=c: ce_grad(p, xs[c], ys[c])) for c in (0, 1)]
  deltas = [tree_axpy(-1.0, w0, t) for t in trained]
  w1 = tree_axpy(eta, weighted(deltas, [0.5, 0.5]), w0)
  server = sim.algorithm_state(state).server
  assert_close(server.params, w1)
  np.testing.assert_allclose(server.seen_counts, counts[0] + counts[1])
  for c in (0, 1):
    assert_close(jax.tree.map(lambda a, c=c: a[c], state.device.clients.local_params), trained[c])
  memorized = jnp.asarray(counts[0] + counts[1] > 0, jnp.float32)
  assert_one_generator_sgd_step(
    init.server.generator.params, server.generator.params, w1, jax.random.split(rng)[1], memorized
  )


@pytest.mark.slow
def test_apfl_fedasync_server_step():
  """FedAsync, a = 0.6 s(0): client 0 arrives first: w1 = (1 - a) w0 + a w_0', w_0' its
  trained copy; one generator step with the mixture w1 (the model the server holds) as the
  teacher, not w_0'."""
  data, xs, ys, counts = tiny_images()
  alg = make_apfl(counts)
  config = async_config(
    server='fedasync', concurrency=1, server_mixing=0.6, staleness_function='polynomial'
  )
  sim = simulator.AsyncSimulator(alg, config, 3, np.ones(3))
  init = alg.init(jax.random.key(0))
  rng = jax.random.key(5)
  state, metrics = sim.server_step(sim.init(init), rng, data)
  (client,) = metrics['clients']
  w0 = to_numpy(init.server.params)
  trained = local_sgd(w0, lambda p: ce_grad(p, xs[client], ys[client]))
  w1 = tree_axpy(0.6, trained, tree_axpy(-0.6, w0, w0))
  server = sim.algorithm_state(state).server
  assert_close(server.params, w1)
  np.testing.assert_allclose(server.seen_counts, counts[client])
  assert_one_generator_sgd_step(
    init.server.generator.params,
    server.generator.params,
    w1,
    jax.random.split(rng)[1],
    jnp.asarray(counts[client] > 0, jnp.float32),
  )
