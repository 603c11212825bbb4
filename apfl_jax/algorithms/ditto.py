"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021).

The global model w is trained exactly as in FedAvg. Each client k also keeps a personal
model v_k, trained in the same round on its own data from its previous value (initially
the initial global model) with the regularised objective

  L_k(v_k) + lambda / 2 * ||v_k - w||^2,

where w is the global model the client received this round. Both trainings run inside
one `client_update` (so one vmapped call for the cohort): the global copy with the
client's key, the personal model with `fold_in(key, 1)`. lambda = 0 is Local-only
training of v_k alongside FedAvg. The personalized model of client k is v_k; the loss
a client reports is its global copy's (FedAvg's), and it is finite only when both models
are.
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
from apfl_jax.algorithms.fedprox import proximal_loss
from apfl_jax.core import local_training, options


@flax.struct.dataclass
class DittoClient:
  """Per-client personal model v_k (leaves stacked over clients)."""

  params: Any


def personal_key(rng: jax.Array) -> jax.Array:
  """The key of the personal model's training, derived from the client's round key."""
  return jax.random.fold_in(rng, 1)


@dataclasses.dataclass(frozen=True)
class DittoOptions(options.Options):
  """Ditto's flags."""

  TITLE = 'Ditto'
  ditto_lambda: float = options.option(
    0.1,
    "Ditto: weight lambda of the personal model's pull to the global model.",
    check=options.non_negative,
  )


@registry.register('ditto', options=DittoOptions)
class Ditto(FedAvg):
  """FedAvg plus a personal model per client pulled towards the global model."""

  personalized_axis = 0

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    lam: float,
    num_clients: int,
  ):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    # The personal model's own handle on the optimizer, so that a wrapper of the
    # global copy's `client_optimizer` (FedAsync's proximal term) leaves it alone.
    self.personal_optimizer = client_optimizer
    self.lam = lam
    self.num_clients = num_clients

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> Ditto:
    """Ditto with lambda = config.ditto_lambda, one personal model per partition client."""
    return cls(
      *context.fedavg_args(),
      config.ditto_lambda,
      np.asarray(context.partition.train_counts).shape[0],
    )

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    fedavg = super().init(rng)
    personal = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), fedavg.server.params
    )
    return base.AlgorithmState(server=fedavg.server, clients=DittoClient(params=personal))

  def client_update(self, server, client, index_row, count, rng, data):
    _, output = super().client_update(server, (), index_row, count, rng, data)
    personal, personal_loss = local_training.train_client(
      client.params,
      proximal_loss(self.loss_fn, server.params, self.lam),
      self.personal_optimizer,
      data,
      index_row,
      count,
      personal_key(rng),
      self.schedule,
    )
    return DittoClient(params=personal), output.replace(
      finite=output.finite & base.all_finite(personal, personal_loss)
    )

  def personalized_params(self, state, data):
    return state.clients.params
