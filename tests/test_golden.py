"""Golden tests: each algorithm's math against an independent NumPy implementation.

The shared problem is tiny: 3 clients holding 3, 2 and 4 examples of 4 pixels, 3 classes,
and a linear model logits = (x W1 + b1) W2 + b2 ('body' = (W1, b1), 'head' = (W2, b2)).
Local training is 2 full-batch SGD steps (batch 4 >= every client's count), so which
permutation a client's key draws cannot change a step and the NumPy reference needs no
keys. Every reference is float64 NumPy written from the paper's formula; the JAX side
runs at 'highest' matmul precision so the f32 results also match on GPU (TF32).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apfl_jax.algorithms.apfl import APFL, FriendSetup
from apfl_jax.algorithms.apfl_deng import APFLDeng
from apfl_jax.algorithms.ditto import Ditto
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.fedavg_ft import FedAvgFT
from apfl_jax.algorithms.fedgen import FedGen, generator_optimizer
from apfl_jax.algorithms.fedprox import FedProx
from apfl_jax.algorithms.fedrep import FedRep
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.algorithms.local import LocalOnly
from apfl_jax.asynchrony import simulator
from apfl_jax.config.config import Config
from apfl_jax.core import local_training
from apfl_jax.data.client_data import FederatedData

NUM_CLASSES = 3
COUNTS = (3, 2, 4)
LR = 0.5
RTOL, ATOL = 1e-4, 1e-6


class LinearModel(nn.Module):
  """logits = (x W1 + b1) W2 + b2 with the body/head contract of apfl_jax.models."""

  def setup(self):
    self.body = nn.Dense(NUM_CLASSES)
    self.head = nn.Dense(NUM_CLASSES)

  @property
  def feature_dim(self):
    return NUM_CLASSES

  def features(self, x):
    return self.body(x.reshape(x.shape[0], -1))

  def head_logits(self, h):
    return self.head(h)

  def __call__(self, x):
    return self.head_logits(self.features(x))


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def tiny_data(shape=(2, 2, 1), seed=0):
  """(FederatedData, per-client float64 inputs, per-client labels) of `shape` images."""
  rng = np.random.default_rng(seed)
  n = sum(COUNTS)
  images = rng.integers(0, 256, size=(n, *shape)).astype(np.uint8)
  labels = np.array([0, 1, 2, 2, 0, 1, 1, 2, 0], np.int32)
  index = np.zeros((len(COUNTS), max(COUNTS)), np.int32)
  starts = np.cumsum((0,) + COUNTS)
  for c, count in enumerate(COUNTS):
    index[c, :count] = np.arange(starts[c], starts[c] + count)
  data = FederatedData(
    train_images=jnp.asarray(images),
    train_labels=jnp.asarray(labels),
    test_images=jnp.asarray(images),
    test_labels=jnp.asarray(labels),
    train_index=jnp.asarray(index),
    train_count=jnp.asarray(COUNTS, jnp.int32),
    test_index=jnp.asarray(index),
    test_count=jnp.asarray(COUNTS, jnp.int32),
    union_test_index=jnp.arange(n, dtype=jnp.int32),
    union_test_client=jnp.asarray(np.repeat(np.arange(3), COUNTS), jnp.int32),
    mean=jnp.asarray([0.5], jnp.float32),
    std=jnp.asarray([0.25], jnp.float32),
  )
  x = (images.reshape(n, -1).astype(np.float64) / 255.0 - 0.5) / 0.25
  xs = [x[starts[c] : starts[c + 1]] for c in range(3)]
  ys = [labels[starts[c] : starts[c + 1]] for c in range(3)]
  return data, xs, ys


def schedule():
  """2 full-batch steps per round."""
  return local_training.Schedule.create(4, 0, 2, min(COUNTS), max(COUNTS))


# ---------------------------------------------------------------- NumPy reference


def to_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def tree_axpy(a, x, y):
  """a * x + y, leaf by leaf."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def tree_dot(x, y):
  return sum(float(np.sum(u * v)) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def logits_of(p, x):
  return (x @ p['body']['kernel'] + p['body']['bias']) @ p['head']['kernel'] + p['head']['bias']


def backprop(p, x, g):
  """Gradients of sum(g * logits) with respect to every parameter."""
  h = x @ p['body']['kernel'] + p['body']['bias']
  dh = g @ p['head']['kernel'].T
  return {
    'body': {'kernel': x.T @ dh, 'bias': dh.sum(0)},
    'head': {'kernel': h.T @ g, 'bias': g.sum(0)},
  }


def ce_grad(p, x, y):
  """Gradient of the mean cross-entropy of the linear model on (x, y)."""
  g = (softmax(logits_of(p, x)) - np.eye(NUM_CLASSES)[y]) / len(y)
  return backprop(p, x, g)


def local_sgd(p, grad_fn, steps=2, lr=LR):
  for _ in range(steps):
    p = tree_axpy(-lr, grad_fn(p), p)
  return p


def weighted(trees, weights):
  weights = np.asarray(weights, np.float64)
  return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


def assert_close(actual, expected):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=RTOL, atol=ATOL),
    actual,
    expected,
  )


def one_round(algorithm, data):
  state = algorithm.init(jax.random.key(0))
  new_state, _ = jax.jit(algorithm.run_round)(
    state, jnp.arange(3, dtype=jnp.int32), jax.random.key(1), data
  )
  return state, new_state


# ---------------------------------------------------------------- synchronous algorithms


@pytest.mark.parametrize('mu', [0.0, 0.3])
def test_fedavg_and_fedprox_round(mu):
  """FedProx (mu = 0: FedAvg): w_k <- w_k - lr (grad L_k + mu (w_k - w)), then
  w <- sum_k n_k w_k / sum_k n_k."""
  data, xs, ys = tiny_data()
  if mu:
    alg = FedProx(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0), mu)
  else:
    alg = FedAvg(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0))
  state, new_state = one_round(alg, data)
  w = to_numpy(state.server.params)
  clients = [
    local_sgd(w, lambda p, c=c: tree_axpy(mu, tree_axpy(-1.0, w, p), ce_grad(p, xs[c], ys[c])))
    for c in range(3)
  ]
  assert_close(new_state.server.params, weighted(clients, np.array(COUNTS) / sum(COUNTS)))


def test_ditto_personal_model_and_global_model():
  """Ditto: v_k <- v_k - lr (grad L_k(v_k) + lambda (v_k - w)); w as in FedAvg."""
  data, xs, ys = tiny_data()
  lam = 0.4
  alg = Ditto(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0), lam, 3)
  state, new_state = one_round(alg, data)
  w = to_numpy(state.server.params)
  for c in range(3):
    v = to_numpy(jax.tree.map(lambda a, c=c: a[c], state.clients.params))
    expected = local_sgd(
      v, lambda p, c=c: tree_axpy(lam, tree_axpy(-1.0, w, p), ce_grad(p, xs[c], ys[c]))
    )
    assert_close(jax.tree.map(lambda a, c=c: a[c], new_state.clients.params), expected)
  global_copies = [local_sgd(w, lambda p, c=c: ce_grad(p, xs[c], ys[c])) for c in range(3)]
  assert_close(new_state.server.params, weighted(global_copies, np.array(COUNTS) / sum(COUNTS)))


def test_fedrep_trains_the_head_then_the_body():
  """FedRep with 2 head epochs: 2 x 2 head steps (body frozen), then 2 body steps with the
  new head; the server averages the bodies by examples."""
  data, xs, ys = tiny_data()
  alg = FedRep(
    LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0), 3, head_epochs=2
  )
  state, new_state = one_round(alg, data)
  body = to_numpy(state.server.body)
  bodies = []
  for c in range(3):
    head = to_numpy(jax.tree.map(lambda a, c=c: a[c], state.clients.head))
    head = local_sgd(
      head, lambda h, c=c: ce_grad({'body': body, 'head': h}, xs[c], ys[c])['head'], steps=4
    )
    assert_close(jax.tree.map(lambda a, c=c: a[c], new_state.clients.head), head)
    bodies.append(
      local_sgd(body, lambda b, c=c, h=head: ce_grad({'body': b, 'head': h}, xs[c], ys[c])['body'])
    )
  assert_close(new_state.server.body, weighted(bodies, np.array(COUNTS) / sum(COUNTS)))


def test_apfl_deng_alpha_update():
  """APFL (Deng et al.), simultaneous steps at (w, v, alpha), v_bar = alpha v + (1-alpha) w:
  w -= lr grad L(w); v -= lr alpha grad L(v_bar);
  alpha <- clip(alpha - lr_alpha <v - w, grad L(v_bar)>, 0, 1)."""
  data, xs, ys = tiny_data()
  alpha_lr = 0.3
  alg = APFLDeng(
    LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0), 0.5, alpha_lr, 3
  )
  state, new_state = one_round(alg, data)
  w0 = to_numpy(state.server.params)
  globals_ = []
  for c in range(3):
    w, v = w0, to_numpy(jax.tree.map(lambda a, c=c: a[c], state.clients.params))
    alpha = 0.5
    for _ in range(2):
      mixed = tree_axpy(alpha, v, tree_axpy(-alpha, w, w))
      g_mixed = ce_grad(mixed, xs[c], ys[c])
      new_alpha = np.clip(alpha - alpha_lr * tree_dot(tree_axpy(-1.0, w, v), g_mixed), 0, 1)
      w = tree_axpy(-LR, ce_grad(w, xs[c], ys[c]), w)
      v = tree_axpy(-LR * alpha, g_mixed, v)
      alpha = new_alpha
    assert alpha != 0.5  # the second step moved alpha (v = w in the first)
    np.testing.assert_allclose(new_state.clients.alpha[c], alpha, rtol=RTOL)
    assert_close(jax.tree.map(lambda a, c=c: a[c], new_state.clients.params), v)
    globals_.append(w)
  assert_close(new_state.server.params, weighted(globals_, np.array(COUNTS) / sum(COUNTS)))


def test_local_trains_each_client_alone_across_rounds():
  """Local: v_k <- 2 SGD steps on k's data per round it joins, nothing shared (round 1:
  clients 0, 1, 2; round 2: clients 0, 2)."""
  data, xs, ys = tiny_data()
  alg = LocalOnly(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), 3)
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  v0 = [to_numpy(jax.tree.map(lambda a, c=c: a[c], state.clients.params)) for c in range(3)]
  state, _ = run_round(state, jnp.arange(3, dtype=jnp.int32), jax.random.key(1), data)
  state, _ = run_round(state, jnp.array([0, 2], jnp.int32), jax.random.key(2), data)
  personalized = alg.personalized_params(state, data)
  for c, rounds in enumerate((2, 1, 2)):
    expected = local_sgd(v0[c], lambda p, c=c: ce_grad(p, xs[c], ys[c]), steps=2 * rounds)
    assert_close(jax.tree.map(lambda a, c=c: a[c], personalized), expected)


def test_fedavg_ft_fine_tunes_the_global_model_on_each_client():
  """FedAvg+FT: training is FedAvg's; client k's personalized model is w (the new global
  model) after 2 SGD steps on k's data; dropout client 1 keeps w (it does not fine-tune)."""
  data, xs, ys = tiny_data()
  alg = FedAvgFT(
    LinearModel(),
    (2, 2, 1),
    schedule(),
    optax.sgd(LR),
    optax.sgd(1.0),
    schedule(),
    seed=0,
    dropout_clients=(1,),
    num_clients=3,
  )
  state, new_state = one_round(alg, data)
  w0 = to_numpy(state.server.params)
  trained = [local_sgd(w0, lambda p, c=c: ce_grad(p, xs[c], ys[c])) for c in range(3)]
  w1 = weighted(trained, np.array(COUNTS) / sum(COUNTS))
  assert_close(new_state.server.params, w1)
  personalized = alg.personalized_params(new_state, data)
  for c in range(3):
    expected = w1 if c == 1 else local_sgd(w1, lambda p, c=c: ce_grad(p, xs[c], ys[c]))
    assert_close(jax.tree.map(lambda a, c=c: a[c], personalized), expected)


# ---------------------------------------------------------------- AP-FL


def feature_setup(**config_changes):
  """A feature-space generator setup for LinearModel on 2x2x1 inputs."""
  config = Config(
    generator='feature',
    noise_dim=2,
    generator_hidden_dim=4,
    generator_batch_size=4,
    **config_changes,
  )
  dataset = type(
    'D', (), {'image_shape': (2, 2, 1), 'mean': np.array([0.5]), 'std': np.array([0.25])}
  )()
  return knowledge_transfer.create_setup(
    config, LinearModel(), dataset, np.eye(NUM_CLASSES, dtype=np.float32)
  )


def make_apfl(friend):
  setup = feature_setup(generator_steps=1, global_teacher_weight=1.0)
  _, _, ys = tiny_data()
  counts = np.stack([np.bincount(y, minlength=NUM_CLASSES) for y in ys]).astype(np.float32)
  return APFL(
    LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0), setup, friend, counts, 0
  ), counts


def test_apfl_persistent_local_models_friends_and_interpolation():
  """Round 1 (clients 0, 1, 2) and round 2 (clients 0, 2): every participant trains the
  global model w (its update) and its own theta_local (from w at its first participation),
  each by 2 SGD steps on its real data; w <- sum_k n_k w_k / sum_k n_k; the memory sums
  the label counts. A friend starts from theta_local and (feature generator) takes 2 SGD
  steps on its head with CE(head(G(z, y)), y), y drawn from the client's label mix;
  theta_p = beta theta_local + (1 - beta) theta_friend."""
  data, xs, ys = tiny_data()
  friend = FriendSetup(
    steps=2, batch_size=4, learning_rate=0.3, init='local', labels='client', beta=0.25
  )
  alg, counts = make_apfl(friend)
  run_round = jax.jit(alg.run_round)
  state = alg.init(jax.random.key(0))
  w0 = to_numpy(state.server.params)
  state, _ = run_round(state, jnp.arange(3, dtype=jnp.int32), jax.random.key(1), data)
  state, _ = run_round(state, jnp.array([0, 2], jnp.int32), jax.random.key(2), data)

  sgd = lambda p, c: local_sgd(p, lambda q: ce_grad(q, xs[c], ys[c]))
  w1 = weighted([sgd(w0, c) for c in range(3)], np.array(COUNTS) / sum(COUNTS))
  local = [sgd(sgd(w0, 0), 0), sgd(w0, 1), sgd(sgd(w0, 2), 2)]  # client 1 skips round 2
  w2 = weighted(
    [sgd(w1, 0), sgd(w1, 2)], np.array([COUNTS[0], COUNTS[2]]) / (COUNTS[0] + COUNTS[2])
  )
  assert_close(state.server.params, w2)
  for c in range(3):
    assert_close(jax.tree.map(lambda a, c=c: a[c], state.clients.local_params), local[c])
  np.testing.assert_array_equal(state.clients.has_local, [True, True, True])
  np.testing.assert_allclose(state.server.seen_counts, counts.sum(0) + counts[0] + counts[2])

  personalized = alg.personalized_params(state, data)
  server = state.server
  keys = alg.friend_keys(server)
  memory = jnp.log(knowledge_transfer.memory_label_probs(server.seen_counts))
  for c in range(3):
    theta = local[c]
    head = {k: v.copy() for k, v in theta['head'].items()}
    for key in jax.random.split(keys[c], friend.steps):
      # The generated batch, drawn as train_friend draws it (the math is checked here).
      label_key, reference_key, sample_key = jax.random.split(key, 3)
      y = jax.random.categorical(label_key, jnp.log(counts[c]), shape=(friend.batch_size,))
      reference = jax.random.categorical(reference_key, memory, shape=(alg.setup.batch_size,))
      h = np.asarray(
        generator_lib.generate(
          alg.setup.generator,
          server.generator.params,
          sample_key,
          y,
          alg.setup.noise_dim,
          alg.setup.noise_distribution,
          reference_labels=reference,
        ),
        np.float64,
      )
      y = np.asarray(y)
      g = (softmax(h @ head['kernel'] + head['bias']) - np.eye(NUM_CLASSES)[y]) / len(y)
      head = {'kernel': head['kernel'] - 0.3 * h.T @ g, 'bias': head['bias'] - 0.3 * g.sum(0)}
    theta_friend = {'body': theta['body'], 'head': head}
    assert not np.allclose(head['kernel'], theta['head']['kernel'])
    expected = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, theta, theta_friend)
    assert_close(jax.tree.map(lambda a, c=c: a[c], personalized), expected)


# ---------------------------------------------------------------- FedGen


# The (noise, labels) of every CapturingGenerator call, in order.
CAPTURED = []


class CapturingGenerator(nn.Module):
  """G(z, y) = z A + onehot(y) B; appends its concrete inputs to CAPTURED when it runs."""

  noise_dim: int

  @nn.compact
  def __call__(self, noise, labels, stats_mask=None):
    del stats_mask
    jax.debug.callback(lambda z, y: CAPTURED.append((np.asarray(z), np.asarray(y))), noise, labels)
    a = self.param('A', nn.initializers.normal(1.0), (self.noise_dim, NUM_CLASSES))
    b = self.param('B', nn.initializers.normal(1.0), (NUM_CLASSES, NUM_CLASSES))
    return noise @ a + jax.nn.one_hot(labels, NUM_CLASSES) @ b


@pytest.mark.parametrize(
  'pairs,weighting', [('all', 'per_sample'), ('same_label', 'per_sample'), ('all', 'official')]
)
def test_fedgen_generator_loss_with_diversity_term(pairs, weighting):
  """L_G = lambda (1/B) sum_i sum_k w_{k,y_i} CE(f_k(G_i), y_i)
  + (1 - lambda) exp(-mean_{(i,j) in P} mean_d (z_i - z_j)^2 mean_d |G_i - G_j|),
  w_{k,y} = n_{k,y} / sum_j n_{j,y}; P: every pair, or the pairs with y_i = y_j.
  official (FedGen's code, torch.mean(nll[B] * weight[B, 1]) broadcast to [B, B]): the CE
  term is sum_k mean_i(w_{k,y_i}) mean_i(CE_{k,i})."""
  gen = CapturingGenerator(noise_dim=2)
  state = generator_lib.init_generator(gen, optax.sgd(0.1), jax.random.key(0))
  jax.effects_barrier()
  CAPTURED.clear()
  teachers = {
    'kernel': jax.random.normal(jax.random.key(1), (2, 3, 3)),
    'bias': jax.random.normal(jax.random.key(2), (2, 3)),
  }
  counts = np.array([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
  lam = 0.3
  _, metrics = generator_lib.train_generator(
    gen,
    state,
    optax.sgd(0.1),
    lambda x: jnp.einsum('bf,kfc->kbc', x, teachers['kernel']) + teachers['bias'][:, None],
    jnp.ones(3),
    generator_lib.teacher_weights(counts),
    jax.random.key(3),
    num_steps=1,
    batch_size=5,
    ce_weight=lam,
    noise_dim=2,
    noise_distribution='uniform',
    diversity_pairs=pairs,
    ce_weighting=weighting,
  )
  jax.effects_barrier()
  z, y = CAPTURED[0]
  z = z.astype(np.float64)
  p = to_numpy(state.params)
  g = z @ p['A'] + np.eye(3)[y] @ p['B']
  weights = counts / counts.sum(0)
  ce = 0.0
  for k in range(2):
    log_p = np.log(
      softmax(
        g @ np.asarray(teachers['kernel'][k], np.float64)
        + np.asarray(teachers['bias'][k], np.float64)
      )
    )
    nll = -log_p[np.arange(5), y]
    if weighting == 'official':
      ce += np.mean(nll[None, :] * weights[k, y][:, None])  # torch: nll[B] * weight[B, 1]
    else:
      ce += np.mean(weights[k, y] * nll)
  d_z = np.mean((z[:, None] - z[None]) ** 2, -1)
  d_g = np.mean(np.abs(g[:, None] - g[None]), -1)
  same = (y[:, None] == y[None]) if pairs == 'same_label' else np.ones((5, 5), bool)
  assert pairs == 'all' or not same.all()  # the batch has two labels: the pair sets differ
  diversity = np.exp(-np.sum(same * d_z * d_g) / np.sum(same))
  np.testing.assert_allclose(metrics['ce'], ce, rtol=RTOL)
  np.testing.assert_allclose(metrics['diversity'], diversity, rtol=RTOL)
  np.testing.assert_allclose(metrics['loss'], lam * ce + (1 - lam) * diversity, rtol=RTOL)


def make_fedgen(regularizer):
  setup = feature_setup()
  return FedGen(
    LinearModel(),
    (2, 2, 1),
    schedule(),
    optax.sgd(LR),
    optax.sgd(1.0),
    setup,
    10.0,
    NUM_CLASSES,
    regularizer,
    5.0,
  )


@pytest.mark.parametrize('regularizer,round_index', [('fedgen', 3), ('fedgen', 0), ('pfllib', 0)])
def test_fedgen_client_regularizer_at_round_t(regularizer, round_index):
  """fedgen at round t: CE(x) + alpha_t CE(head(G(z', y_s)), y_s)
  + beta_t KL(softmax(head(G(z, y))) || softmax(f(x))), alpha_t = 10 * 0.98^t,
  beta_t = 5 * 0.98^t, nothing in round 0; pfllib: CE(x) + 10 CE(head(G(z', y_s)), y_s).
  Value and gradient (the KL target and G get no gradient)."""
  _, xs, ys = tiny_data()
  alg = make_fedgen(regularizer)
  # The server has memorized labels 0 and 1 (label 2 is never drawn).
  server = alg.init(jax.random.key(0)).server.replace(
    round=jnp.asarray(round_index, jnp.int32), seen_counts=jnp.array([3.0, 1.0, 0.0])
  )
  x = np.concatenate([xs[0], xs[1][:1]])
  y = np.concatenate([ys[0], ys[1][:1]])
  mask = np.array([1.0, 1.0, 1.0, 0.0])
  key = jax.random.key(4)
  loss, grads = jax.jit(jax.value_and_grad(alg.client_loss(server)))(
    server.params,
    jnp.asarray(x.reshape(4, 2, 2, 1), jnp.float32),
    jnp.asarray(y),
    jnp.asarray(mask, jnp.float32),
    key,
  )
  # The generated features, drawn as client_loss draws them (the math is checked below).
  label_key, noise_key = jax.random.split(key)
  sampled = np.asarray(
    jax.random.categorical(label_key, jnp.log(jnp.array([1.0, 1.0, 0.0])), shape=(4,))
  )
  generate = lambda k, labels, reference=None: np.asarray(
    generator_lib.generate(
      alg.setup.generator,
      server.generator.params,
      k,
      jnp.asarray(labels),
      alg.setup.noise_dim,
      alg.setup.noise_distribution,
      reference_labels=reference,
    ),
    np.float64,
  )
  # The KL target's BatchNorm statistics come from a reference batch drawn from the memory.
  reference = jax.random.categorical(
    jax.random.fold_in(key, 3), jnp.log(jnp.array([1.0, 1.0, 0.0])), shape=(4,)
  )
  fake = generate(noise_key, sampled)
  same_label = generate(jax.random.fold_in(key, 2), y, reference)
  p = to_numpy(server.params)
  head = lambda h: h @ p['head']['kernel'] + p['head']['bias']
  q = softmax(logits_of(p, x))
  n = mask.sum()
  expected_loss = -np.sum(mask * np.log(q[np.arange(4), y])) / n
  g_real = mask[:, None] * (q - np.eye(3)[y]) / n
  expected = backprop(p, x, g_real)
  alpha = beta = 0.0
  if regularizer == 'pfllib':
    alpha = 10.0
  elif round_index > 0:
    alpha, beta = 10.0 * 0.98**round_index, 5.0 * 0.98**round_index
  p_fake = softmax(head(fake))
  expected_loss += alpha * -np.mean(np.log(p_fake[np.arange(4), sampled]))
  g_fake = alpha * (p_fake - np.eye(3)[sampled]) / 4
  expected['head']['kernel'] = expected['head']['kernel'] + fake.T @ g_fake
  expected['head']['bias'] = expected['head']['bias'] + g_fake.sum(0)
  target = softmax(head(same_label))
  kl = np.sum(target * (np.log(target) - np.log(q)), -1)
  expected_loss += beta * np.sum(mask * kl) / n
  expected = tree_axpy(1.0, expected, backprop(p, x, beta * mask[:, None] * (q - target) / n))
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL)
  assert_close(grads, expected)


def test_fedgen_generator_optimizer_is_adam_with_l2_and_per_round_decay():
  """torch Adam(weight_decay) + ExponentialLR(0.98) stepped once per round of 2 steps."""
  lr, wd, steps_per_round = 0.1, 0.01, 2
  opt = generator_optimizer(lr, wd, 0.98, steps_per_round)
  params = jnp.array([1.0, -2.0])
  grads = [
    jnp.array([0.5, 0.1]),
    jnp.array([-0.3, 0.2]),
    jnp.array([0.2, 0.2]),
    jnp.array([1.0, -1.0]),
  ]
  state = opt.init(params)
  p, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
  for t, g in enumerate(grads, 1):
    updates, state = opt.update(g, state, params)
    params = optax.apply_updates(params, updates)
    g = np.asarray(g, np.float64) + wd * p
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
    step_lr = lr * 0.98 ** ((t - 1) // steps_per_round)
    p = p - step_lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
  np.testing.assert_allclose(params, p, rtol=1e-5)


# ---------------------------------------------------------------- asynchronous servers


def staleness(tau, function):
  """s(tau) with a = 0.5, b = 0: constant 1, (tau + 1)^-a, 1 / (a (tau - b) + 1)."""
  return {
    'constant': 1.0,
    'polynomial': (tau + 1.0) ** -0.5,
    'hinge': 1.0 / (0.5 * max(tau, 0) + 1.0),
  }[function]


def async_config(**changes):
  return Config(
    num_clients=3,
    concurrency=3,
    speed_distribution='constant',
    staleness_exponent=0.5,
    staleness_hinge_b=0.0,
    max_staleness=4,
    seed=0,
  ).replace(**changes)


@pytest.mark.parametrize('function,rho', [('constant', 0.0), ('polynomial', 0.0), ('hinge', 0.4)])
def test_fedasync_mixing_with_staleness_and_proximal_term(function, rho):
  """FedAsync: clients 0 and 1 start at x0 and arrive together; client 0 (tau 0) then
  client 1 (tau 1) give x_{t+1} = (1 - a s(tau)) x_t + a s(tau) x_client, x_client trained
  on L + rho/2 ||x - x0||^2."""
  data, xs, ys = tiny_data()
  alg = FedAvg(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(1.0))
  config = async_config(
    num_clients=2,
    concurrency=2,
    server='fedasync',
    server_mixing=0.6,
    staleness_function=function,
    fedasync_rho=rho,
  )
  sim = simulator.AsyncSimulator(alg, config, 2, np.ones(2))
  init = alg.init(jax.random.key(0))
  async_state = sim.init(init)
  x0 = to_numpy(init.server.params)
  expected = x0
  for step, (client, tau) in enumerate(((0, 0), (1, 1)), 1):
    async_state, metrics = sim.server_step(async_state, jax.random.key(step), data)
    assert metrics['clients'] == [client] and metrics['staleness'] == [tau]
    trained = local_sgd(
      x0, lambda p, c=client: tree_axpy(rho, tree_axpy(-1.0, x0, p), ce_grad(p, xs[c], ys[c]))
    )
    a = 0.6 * staleness(tau, function)
    expected = tree_axpy(a, trained, tree_axpy(-a, expected, expected))
  assert_close(sim.algorithm_state(async_state).server.params, expected)


@pytest.mark.parametrize('weighting', ['uniform', 'examples'])
def test_fedbuff_step_is_the_staleness_weighted_buffer_mean_times_server_lr(weighting):
  """FedBuff, K = 2, server sgd(eta): x <- x + eta * (1/K) sum_k s(tau_k) delta_k
  (uniform) or x + eta * sum_k n_k s(tau_k) delta_k / sum_k n_k (examples). All three
  clients start at x0 and arrive at time 2: step 1 buffers clients 0 and 1 (tau 0); step 2
  buffers client 2 (tau 1, from x0) and client 0 again (tau 0, from x1) at time 4."""
  data, xs, ys = tiny_data()
  eta = 0.7
  alg = FedAvg(LinearModel(), (2, 2, 1), schedule(), optax.sgd(LR), optax.sgd(eta))
  config = async_config(
    server='fedbuff', buffer_size=2, staleness_function='polynomial', fedbuff_weighting=weighting
  )
  sim = simulator.AsyncSimulator(alg, config, 3, np.full(3, 2))
  init = alg.init(jax.random.key(0))
  async_state = sim.init(init)
  x = to_numpy(init.server.params)
  starts = {0: x, 1: x, 2: x}
  for step, buffer in enumerate(([(0, 0), (1, 0)], [(2, 1), (0, 0)]), 1):
    async_state, metrics = sim.server_step(async_state, jax.random.key(step), data)
    assert metrics['clients'] == [c for c, _ in buffer]
    assert metrics['staleness'] == [tau for _, tau in buffer]
    deltas = [
      tree_axpy(-1.0, starts[c], local_sgd(starts[c], lambda p, c=c: ce_grad(p, xs[c], ys[c])))
      for c, _ in buffer
    ]
    n = np.array([COUNTS[c] for c, _ in buffer], np.float64)
    share = np.full(2, 0.5) if weighting == 'uniform' else n / n.sum()
    coefficients = [w * staleness(tau, 'polynomial') for w, (_, tau) in zip(share, buffer)]
    x = tree_axpy(eta, weighted(deltas, coefficients), x)
    starts.update({c: x for c, _ in buffer})
  assert_close(sim.algorithm_state(async_state).server.params, x)
