"""FedGen (Zhu, Hong and Zhou, ICML 2021): data-free knowledge distillation with a
server-side feature generator.

Clients train as in FedAvg, regularised by generated features: their loss is
  CE(model(x), y) + alpha * CE(head(G(z, A(y_s))), y_s),  y_s ~ U(labels the server memorized)
(the form PFLlib uses; the generator is frozen on the clients). The clients send their
update and their label counts; the server averages the updates (FedAvg) and trains the
generator on the round's client models as teachers (`knowledge_transfer`). As in the
original, A(y) defaults to a one-hot code (--embedding=onehot) and the generator makes
head inputs (--generator=feature). Personalized accuracy is the global model's, as for
FedAvg.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from apfl_jax import generator as generator_lib
from apfl_jax import local_training
from apfl_jax.algorithms import base
from apfl_jax.algorithms import knowledge_transfer
from apfl_jax.algorithms.fedavg import FedAvg


@flax.struct.dataclass
class FedGenServer:
  """Global model, its optimizer state, the generator and the label memory.

  Attributes:
    seen_counts: float [num_classes] labels the server has learned from, summed over
      every round (`knowledge_transfer.aggregate_and_distill`).
  """
  params: Any
  opt_state: Any
  generator: generator_lib.GeneratorState
  seen_counts: jax.Array


class FedGen(FedAvg):
  """FedAvg whose clients also fit generated features of the global label space."""

  def __init__(self, model: Any, image_shape: tuple[int, ...],
               schedule: local_training.Schedule,
               client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation,
               setup: knowledge_transfer.GeneratorSetup, alpha: float, num_classes: int):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.setup = setup
    self.alpha = alpha
    self.num_classes = num_classes

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    model_rng, generator_rng = jax.random.split(rng)
    fedavg = super().init(model_rng)
    generator = generator_lib.init_generator(self.setup.generator, self.setup.optimizer,
                                             generator_rng)
    return base.AlgorithmState(
        server=FedGenServer(params=fedavg.server.params, opt_state=fedavg.server.opt_state,
                            generator=generator,
                            seen_counts=jnp.zeros((self.num_classes,), jnp.float32)),
        clients=())

  def client_update(self, server, client, index_row, count, rng, data):
    setup, model = self.setup, self.model

    def loss_fn(params, images, labels, example_mask, key):
      real = local_training.masked_cross_entropy(
          model.apply({'params': params}, images), labels, example_mask)
      label_key, noise_key = jax.random.split(key)
      sampled = jax.random.categorical(
          label_key, jnp.log(knowledge_transfer.memory_label_probs(server.seen_counts)),
          shape=labels.shape)
      features = jax.lax.stop_gradient(generator_lib.generate(
          setup.generator, server.generator.params, noise_key, sampled, setup.noise_dim,
          setup.noise_distribution))
      logits = model.apply({'params': params}, features, method='head_logits')
      generated = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, sampled))
      return real + self.alpha * generated

    params, loss = local_training.train_client(
        server.params, loss_fn, self.client_optimizer, data, index_row, count, rng,
        self.schedule)
    return client, knowledge_transfer.labelled_output(params, server.params, loss, data,
                                                      index_row, count, self.num_classes)

  def server_update(self, server, outputs, rng):
    params, opt_state, generator, seen_counts = knowledge_transfer.aggregate_and_distill(
        self, server, outputs, rng)
    return FedGenServer(params=params, opt_state=opt_state, generator=generator,
                        seen_counts=seen_counts)
