"""FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations
for Personalized Federated Learning", ICML 2021).

The model's parameters split into a shared representation ('body') and a per-client
'head'. In a round, client k starts from (global body phi, its own head h_k) and
  1. trains the head alone for --fedrep_head_epochs epochs (body frozen):
       h_k <- argmin_h L_k(phi, h);
  2. trains the body alone for --local_epochs epochs (new head frozen):
       phi_k <- argmin_phi L_k(phi, h_k);
(with --local_steps, the head phase takes fedrep_head_epochs x local_steps steps). The
paper trains the head for 10 epochs per body epoch (the default); PFLlib's default, and
its published table, is 1 (`experiments/pfllib_fmnist*.flags` pin it).
and sends phi_k - phi; the server applies the sample-weighted mean of the body updates
(FedAvg on the body only). Heads never leave the clients. Each phase has its own key
(the client's key split in two) and a fresh client optimizer.

Personalized model of client k: (current global body, h_k), as the original code and
PFLlib evaluate it (the latest representation with the client's own head); a client that
never trained keeps the initial head.

Global model: (global body, mean of the clients' heads weighted by the training examples
of the clients that have trained). Every head was fitted on the features of a recent
global body, so their average is a meaningful classifier over all classes, which a
single client's head is not; before any client has trained it is the initial head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.algorithms import base, registry
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.core import local_training, options


@flax.struct.dataclass
class FedRepServer:
  """The global body and the server optimizer's state over it."""

  body: Any
  opt_state: Any


@flax.struct.dataclass
class FedRepClient:
  """Per-client head and weight (training examples; 0 until the client trains)."""

  head: Any
  weight: jax.Array


@dataclasses.dataclass(frozen=True)
class FedRepOptions(options.Options):
  """FedRep's flags."""

  TITLE = 'FedRep'
  fedrep_head_epochs: int = options.option(
    10,
    'FedRep: local epochs of the head phase before the --local_epochs of the body (the '
    'paper: 10; PFLlib: 1).',
    check=options.positive,
  )


@registry.register('fedrep', options=FedRepOptions)
class FedRep(FedAvg):
  """Shared body averaged by the server, heads kept and trained by the clients."""

  personalized_axis = 0

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    num_clients: int,
    head_epochs: int,
  ):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.num_clients = num_clients
    self.head_epochs = head_epochs

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> FedRep:
    """FedRep with one head per partition client and config.fedrep_head_epochs."""
    return cls(
      *context.fedavg_args(),
      np.asarray(context.partition.train_counts).shape[0],
      config.fedrep_head_epochs,
    )

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    params = base.init_model_params(self.model, rng, self.image_shape)
    heads = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params['head']
    )
    return base.AlgorithmState(
      server=FedRepServer(
        body=params['body'], opt_state=self.server_optimizer.init(params['body'])
      ),
      clients=FedRepClient(head=heads, weight=jnp.zeros((self.num_clients,), jnp.float32)),
    )

  def train_head(self, body, head, index_row, count, rng, data):
    """Phase 1: trains the head for `head_epochs` epochs with the body frozen.

    Returns:
      (trained head, mean loss).
    """
    loss_fn = lambda h, *batch: self.loss_fn({'body': body, 'head': h}, *batch)
    return local_training.train_client(
      head,
      loss_fn,
      self.client_optimizer,
      data,
      index_row,
      count,
      rng,
      self.schedule.with_epochs(self.head_epochs),
    )

  def train_body(self, body, head, index_row, count, rng, data):
    """Phase 2: trains the body on the client's data with the head frozen.

    Returns:
      (trained body, mean loss).
    """
    loss_fn = lambda b, *batch: self.loss_fn({'body': b, 'head': head}, *batch)
    return local_training.train_client(
      body, loss_fn, self.client_optimizer, data, index_row, count, rng, self.schedule
    )

  def client_update(self, server, client, index_row, count, rng, data):
    head_key, body_key = jax.random.split(rng)
    head, head_loss = self.train_head(server.body, client.head, index_row, count, head_key, data)
    body, loss = self.train_body(server.body, head, index_row, count, body_key, data)
    num_examples = count.astype(jnp.float32)
    return FedRepClient(head=head, weight=num_examples), base.ClientOutput(
      update=jax.tree.map(jnp.subtract, body, server.body),
      num_examples=num_examples,
      loss=loss,
      finite=base.all_finite(head, body, head_loss, loss),
    )

  def server_update(self, server, outputs, rng):
    del rng
    body, opt_state = self.apply_mean_update(
      server.body, server.opt_state, outputs.update, outputs.num_examples
    )
    return FedRepServer(body=body, opt_state=opt_state)

  def personalized_params(self, state, data):
    body = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), state.server.body
    )
    return {'body': body, 'head': state.clients.head}

  def global_params(self, state):
    weight = state.clients.weight
    weight = jnp.where(jnp.sum(weight) > 0, weight, jnp.ones_like(weight))
    return {'body': state.server.body, 'head': base.weighted_mean(state.clients.head, weight)}
