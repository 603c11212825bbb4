"""AP-FL: personalized FL through global memorization (arXiv 2503.00407).

Per round:
  1. the cohort trains local models on real data from the global model (one vmapped call)
     and sends the updates and its label counts;
  2. the server averages the updates (FedAvg) and trains the semantic generator
     G(z, A(c)) on the round's client models as teachers (`knowledge_transfer`); A(c) is
     a text embedding of the class name, so G can be sampled for classes no active client
     holds (zero-shot, e.g. the monopoly classes of dropout clients);
  3. each client k trains a friend model on generated samples and personalizes by
     decoupled interpolation  theta_p = beta * theta_local + (1 - beta) * theta_friend.

Friend models are a pure function of (local model, generator, key), so they are computed
when personalized models are needed (`personalized_params`, inside the jitted evaluation),
for every client in one vmapped call: the result is what each client holds after
downloading the current generator. A client that never trained (a dropout client with
--dropout_round=0) takes the global model as its local model.

With --generator=feature the generator makes head inputs: the friend keeps the local
body and trains only its head on generated features. With --generator=image it makes
images and the whole friend model trains on them.

`unseen_class_params` is the zero-shot probe: the global model whose friend training
covered every class uniformly, scored on the classes no active client holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax import generator as generator_lib
from apfl_jax import local_training
from apfl_jax.algorithms import base
from apfl_jax.algorithms import knowledge_transfer
from apfl_jax.algorithms.fedavg import FedAvg


@flax.struct.dataclass
class APFLServer:
  """Global model, its optimizer state, the generator, the labels it was taught, round."""
  params: Any
  opt_state: Any
  generator: generator_lib.GeneratorState
  taught_labels: jax.Array
  round: jax.Array


@flax.struct.dataclass
class APFLClient:
  """Per-client local model (stacked) and whether the client has trained yet."""
  local_params: Any
  has_local: jax.Array


@dataclasses.dataclass(frozen=True)
class FriendSetup:
  """Static settings of friend-model training.

  Attributes:
    steps: optimizer steps, ceil(synthetic_per_class * num_classes / batch_size).
    batch_size: generated samples per step.
    learning_rate: SGD learning rate.
    init: 'local' or 'global': where a friend model starts.
    labels: 'client' (the client's own label mix) or 'all' (every class uniformly).
    beta: interpolation weight of the local model.
  """
  steps: int
  batch_size: int
  learning_rate: float
  init: str
  labels: str
  beta: float

  @classmethod
  def from_config(cls, config: Any, num_classes: int) -> 'FriendSetup':
    return cls(steps=math.ceil(config.synthetic_per_class * num_classes
                               / config.friend_batch_size),
               batch_size=config.friend_batch_size,
               learning_rate=config.friend_learning_rate, init=config.friend_init,
               labels=config.friend_labels, beta=config.beta)


def interpolate(local: Any, friend: Any, beta: float) -> Any:
  """beta * local + (1 - beta) * friend, leaf by leaf."""
  return jax.tree.map(lambda l, f: beta * l + (1.0 - beta) * f, local, friend)


class APFL(FedAvg):
  """AP-FL with a semantic generator, friend models and decoupled interpolation."""
  personalized_axis = 0

  def __init__(self, model: Any, image_shape: tuple[int, ...],
               schedule: local_training.Schedule,
               client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation,
               setup: knowledge_transfer.GeneratorSetup, friend: FriendSetup,
               label_counts: np.ndarray, seed: int):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.setup = setup
    self.friend = friend
    self.label_counts = np.asarray(label_counts, np.float32)
    self.num_clients, self.num_classes = self.label_counts.shape
    self.seed = seed

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    model_rng, generator_rng = jax.random.split(rng)
    fedavg = super().init(model_rng)
    params = fedavg.server.params
    generator = generator_lib.init_generator(self.setup.generator, self.setup.optimizer,
                                             generator_rng)
    held = (self.label_counts.sum(0) > 0).astype(np.float32)
    server = APFLServer(params=params, opt_state=fedavg.server.opt_state,
                        generator=generator, taught_labels=jnp.asarray(held),
                        round=jnp.zeros((), jnp.int32))
    clients = APFLClient(
        local_params=jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)),
                                  params),
        has_local=jnp.zeros((self.num_clients,), bool))
    return base.AlgorithmState(server=server, clients=clients)

  def client_update(self, server, client, index_row, count, rng, data):
    params, loss = local_training.train_client(
        server.params, self.loss_fn, self.client_optimizer, data, index_row, count, rng,
        self.schedule)
    output = knowledge_transfer.labelled_output(params, server.params, loss, data, index_row,
                                                count, self.num_classes)
    return APFLClient(local_params=params, has_local=jnp.asarray(True)), output

  def server_update(self, server, outputs, rng):
    params, opt_state, generator, taught = knowledge_transfer.aggregate_and_distill(
        self, server, outputs, rng)
    return APFLServer(params=params, opt_state=opt_state, generator=generator,
                      taught_labels=taught, round=server.round + 1)

  def train_friend(self, server: APFLServer, init_params: Any, label_probs: jax.Array,
                   rng: jax.Array) -> Any:
    """Trains one friend model on generated samples.

    Args:
      server: the server state (generator and the labels it was taught).
      init_params: the friend's starting parameters.
      label_probs: [num_classes] sampling weights of the generated labels.
      rng: key.

    Returns:
      The friend's parameters.
    """
    setup, model, friend = self.setup, self.model, self.friend
    optimizer = optax.sgd(friend.learning_rate)
    feature_space = setup.kind == 'feature'
    trainable = init_params['head'] if feature_space else init_params

    def loss_fn(weights, samples, labels):
      params = {'body': init_params['body'], 'head': weights} if feature_space else weights
      logits = knowledge_transfer.sample_logits(model, setup.kind, params, samples)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def step(carry, key):
      weights, opt_state = carry
      label_key, reference_key, sample_key = jax.random.split(key, 3)
      labels = jax.random.categorical(label_key, jnp.log(label_probs),
                                      shape=(friend.batch_size,))
      reference = jax.random.categorical(reference_key, jnp.log(server.taught_labels),
                                         shape=(setup.batch_size,))
      samples = jax.lax.stop_gradient(generator_lib.generate(
          setup.generator, server.generator.params, sample_key, labels, setup.noise_dim,
          setup.noise_distribution, reference_labels=reference))
      grads = jax.grad(loss_fn)(weights, samples, labels)
      updates, opt_state = optimizer.update(grads, opt_state, weights)
      return (optax.apply_updates(weights, updates), opt_state), None

    (trained, _), _ = jax.lax.scan(step, (trainable, optimizer.init(trainable)),
                                   jax.random.split(rng, friend.steps))
    return {'body': init_params['body'], 'head': trained} if feature_space else trained

  def _friend_key(self, server: APFLServer) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed + 1), server.round)

  def local_models(self, state: base.AlgorithmState) -> Any:
    """Each client's local model; the global model for clients that never trained."""
    server, clients = state.server, state.clients
    return jax.tree.map(
        lambda local, g: jnp.where(
            clients.has_local.reshape((-1,) + (1,) * g.ndim), local, g[None]),
        clients.local_params, server.params)

  def personalized_params(self, state, data):
    server = state.server
    local = self.local_models(state)
    if self.friend.init == 'local':
      start = local
    else:
      start = jax.tree.map(lambda g: jnp.broadcast_to(g, (self.num_clients, *g.shape)),
                           server.params)
    if self.friend.labels == 'client':
      label_probs = jnp.asarray(self.label_counts)
    else:
      label_probs = jnp.ones((self.num_clients, self.num_classes), jnp.float32)
    keys = jax.random.split(self._friend_key(server), self.num_clients)
    friends = jax.vmap(self.train_friend, in_axes=(None, 0, 0, 0))(
        server, start, label_probs, keys)
    return interpolate(local, friends, self.friend.beta)

  def unseen_class_params(self, state, data):
    server = state.server
    return self.train_friend(server, server.params,
                             jnp.ones((self.num_classes,), jnp.float32),
                             jax.random.fold_in(self._friend_key(server), self.num_clients))
