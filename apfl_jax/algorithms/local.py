"""Local-only training: every client trains its own model and nothing is shared.

All clients start from the same initial model. The server keeps no model, so there is
no global accuracy (reported as null).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from apfl_jax.algorithms import base, registry
from apfl_jax.core import local_training


@flax.struct.dataclass
class LocalClient:
  params: Any


@registry.register('local')
class LocalOnly(base.Algorithm):
  """Each client's model is trained on its own data alone."""

  personalized_axis = 0

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> LocalOnly:
    """One model per client of --num_clients."""
    return cls(
      context.model,
      context.dataset.image_shape,
      context.schedule,
      context.client_optimizer,
      config.num_clients,
    )

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    num_clients: int,
  ):
    self.model = model
    self.image_shape = image_shape
    self.schedule = schedule
    self.client_optimizer = client_optimizer
    self.num_clients = num_clients
    self.loss_fn = base.classification_loss(model)

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    params = base.init_model_params(self.model, rng, self.image_shape)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params)
    return base.AlgorithmState(server=(), clients=LocalClient(params=stacked))

  def client_update(self, server, client, index_row, count, rng, data):
    params, loss = local_training.train_client(
      client.params, self.loss_fn, self.client_optimizer, data, index_row, count, rng, self.schedule
    )
    return LocalClient(params=params), base.ClientOutput(
      update=(),
      num_examples=count.astype(jnp.float32),
      loss=loss,
      finite=base.all_finite(params, loss),
    )

  def server_update(self, server, outputs, rng):
    del rng
    return server

  def personalized_params(self, state, data):
    return state.clients.params

  def global_params(self, state):
    return None
