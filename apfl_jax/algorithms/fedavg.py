"""FedAvg (McMahan et al., 2017) with an optax server optimizer.

Each client starts from the global model, trains locally and sends back its parameter
change; the server averages the changes weighted by the clients' example counts and
applies the negated mean as a pseudo-gradient through its optax optimizer. Plain SGD
with learning rate 1 (the default) is exactly sample-weighted parameter averaging.
Personalized accuracy of FedAvg is the global model's accuracy on each client's test
split.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from apfl_jax.algorithms import base, registry
from apfl_jax.core import local_training


@flax.struct.dataclass
class FedAvgServer:
  params: Any
  opt_state: Any


@registry.register('fedavg')
class FedAvg(base.Algorithm):
  """Sample-weighted federated averaging."""

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> FedAvg:
    """FedAvg with the context's optimizers."""
    del config
    return cls(*context.fedavg_args())

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
  ):
    self.model = model
    self.image_shape = image_shape
    self.schedule = schedule
    self.client_optimizer = client_optimizer
    self.server_optimizer = server_optimizer
    self.loss_fn = base.classification_loss(model)

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    params = base.init_model_params(self.model, rng, self.image_shape)
    return base.AlgorithmState(
      server=FedAvgServer(params=params, opt_state=self.server_optimizer.init(params)), clients=()
    )

  def client_update(self, server, client, index_row, count, rng, data):
    params, loss = local_training.train_client(
      server.params, self.loss_fn, self.client_optimizer, data, index_row, count, rng, self.schedule
    )
    delta = jax.tree.map(jnp.subtract, params, server.params)
    return client, base.ClientOutput(
      update=delta,
      num_examples=count.astype(jnp.float32),
      loss=loss,
      finite=base.all_finite(params, loss),
    )

  def run_round(self, state, cohort, rng, data):
    """`Algorithm.run_round`; in chunks, the updates are summed as the chunks train.

    With --client_chunk_size the clients' weighted updates are added up chunk by chunk
    (`ClientMap.map_and_sum`) instead of stacked, so the round's memory does not grow
    with the cohort. Taken when the server update is FedAvg's own (the weighted mean of
    the updates: FedAvg, FedProx, Ditto, APFLDeng) and the cohort trains as one size
    group; equal to the stacked round up to float rounding.
    """
    client_map = self.client_map
    if (
      not client_map.chunk_size
      or cohort.shape[0] <= client_map.chunk_size * client_map.num_shards
      or type(self).server_update is not FedAvg.server_update
      or len(self.schedule.buckets(cohort.shape[0])) > 1
    ):
      return super().run_round(state, cohort, rng, data)
    client_rng, server_rng = jax.random.split(rng)
    keys = jax.vmap(lambda c: jax.random.fold_in(client_rng, c))(cohort)

    def train(server, client, index_row, count, key):
      client, out = self.client_update(server, client, index_row, count, key, data)
      weighted = jax.tree.map(lambda u: u * out.num_examples, out.update)
      return (client, out.loss, out.finite), (weighted, out.num_examples)

    (clients, loss, finite), (total, weight) = client_map.map_and_sum(
      train,
      (None, 0, 0, 0, 0),
      state.server,
      base.gather_clients(state.clients, cohort),
      data.train_index[cohort],
      data.train_count[cohort],
      keys,
    )
    # The mean as one client of weight 1: `server_update`'s weighted mean passes it on.
    mean = jax.tree.map(lambda t: (t / jnp.maximum(weight, 1e-12))[None], total)
    outputs = base.ClientOutput(update=mean, num_examples=jnp.ones((1,)), loss=loss, finite=finite)
    return base.AlgorithmState(
      server=self.server_update(state.server, outputs, server_rng),
      clients=base.scatter_clients(state.clients, cohort, clients),
    ), base.RoundMetrics(loss=loss, finite=finite)

  def server_update(self, server, outputs, rng):
    del rng
    params, opt_state = self.apply_mean_update(
      server.params, server.opt_state, outputs.update, outputs.num_examples
    )
    return FedAvgServer(params=params, opt_state=opt_state)

  def apply_mean_update(self, params, opt_state, deltas, weights):
    """Applies the weighted mean of the deltas through the server optimizer.

    Args:
      params: the global parameters.
      opt_state: the server optimizer's state.
      deltas: the clients' parameter changes, stacked.
      weights: [K] weight of each client (its example count).

    Returns:
      (new params, new optimizer state).
    """
    pseudo_grad = jax.tree.map(jnp.negative, base.weighted_mean(deltas, weights))
    updates, opt_state = self.server_optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def personalized_params(self, state, data):
    return state.server.params

  def global_params(self, state):
    return state.server.params
