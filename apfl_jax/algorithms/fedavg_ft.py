"""FedAvg with local fine-tuning (FedAvg-FT), the usual personalization baseline (e.g.
Wang et al. 2019, "Federated Evaluation of On-device Personalization").

Training is exactly FedAvg. Client k's personalized model is the current global model
fine-tuned on k's training data for --finetune_epochs epochs with the client optimizer
(fresh state), computed when personalized models are needed (`personalized_params`,
inside the jitted evaluation) for every client through the client map. Client k's
fine-tuning key is fold_in(fold_in(fold_in(key(seed), FINETUNE_STREAM), round), k), so
the personalized models are a deterministic function of the state. With
--finetune_epochs=0 the personalized model is the global one.

Dropout clients (--dropout_clients) train on none of their data once they drop out, in
every algorithm here, so they do not fine-tune (at any evaluation, also before
--dropout_round): their personalized model is the global one. Fine-tuning a dropout
client on its own data would hand FedAvg+FT the very data the dropout scenario keeps out
of training.
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

# Folded into key(seed) so that the fine-tuning keys differ from the runner's round keys
# fold_in(key(seed), round).
FINETUNE_STREAM = 2**31 - 1


@flax.struct.dataclass
class FedAvgFTServer:
  """Global model, its optimizer state and the number of rounds done."""

  params: Any
  opt_state: Any
  round: jax.Array


@dataclasses.dataclass(frozen=True)
class FedAvgFTOptions(options.Options):
  """FedAvg+FT's flags."""

  TITLE = 'FedAvg+FT'
  finetune_epochs: int = options.option(
    1,
    'FedAvg+FT: local epochs of fine-tuning before evaluation.',
    check=options.non_negative,
  )


@registry.register('fedavg_ft', options=FedAvgFTOptions)
class FedAvgFT(FedAvg):
  """FedAvg whose personalized models are the global model fine-tuned on each client."""

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    finetune_schedule: local_training.Schedule | None,
    seed: int,
    dropout_clients: tuple[int, ...] = (),
    num_clients: int = 0,
  ):
    """Builds the algorithm.

    Args:
      model: the Flax model.
      image_shape: (H, W, C) of the inputs.
      schedule: the local-training schedule of the FedAvg rounds.
      client_optimizer: the client optimizer (also used to fine-tune).
      server_optimizer: the server optimizer.
      finetune_schedule: the schedule of the fine-tuning, or None for no fine-tuning
        (then the personalized model is the global one).
      seed: the experiment seed the fine-tuning keys derive from.
      dropout_clients: clients that do not fine-tune (they hold the global model).
      num_clients: the number of clients (needed with dropout_clients).
    """
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.finetune_schedule = finetune_schedule
    self.seed = seed
    self.fine_tunes = np.ones((num_clients,), bool)
    self.fine_tunes[list(dropout_clients)] = False
    self.personalized_axis = None if finetune_schedule is None else 0

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> FedAvgFT:
    """FedAvg-FT fine-tuning for config.finetune_epochs epochs of config.batch_size."""
    finetune_schedule = None
    if config.finetune_epochs > 0:
      counts = np.asarray(context.partition.train_counts).sum(1)
      finetune_schedule = local_training.Schedule.create(
        config.batch_size, config.finetune_epochs, 0, int(counts.min()), int(counts.max())
      )
    num_clients = np.asarray(context.partition.train_counts).shape[0]
    return cls(
      *context.fedavg_args(),
      finetune_schedule,
      config.seed,
      config.dropout_client_ids(context.partition.monopoly_clients),
      num_clients,
    )

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    fedavg = super().init(rng)
    return base.AlgorithmState(
      server=FedAvgFTServer(
        params=fedavg.server.params,
        opt_state=fedavg.server.opt_state,
        round=jnp.zeros((), jnp.int32),
      ),
      clients=fedavg.clients,
    )

  def server_update(self, server, outputs, rng):
    del rng
    params, opt_state = self.apply_mean_update(
      server.params, server.opt_state, outputs.update, outputs.num_examples
    )
    return FedAvgFTServer(params=params, opt_state=opt_state, round=server.round + 1)

  def finetune_key(self, server: FedAvgFTServer) -> jax.Array:
    """The key of this state's fine-tuning; client k uses fold_in(key, k)."""
    return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(self.seed), FINETUNE_STREAM), server.round
    )

  def personalized_params(self, state, data):
    server = state.server
    schedule = self.finetune_schedule
    if schedule is None:
      return server.params
    key = self.finetune_key(server)
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(data.num_clients))

    def finetune(index_row, count, key):
      params, _ = local_training.train_client(
        server.params,
        self.loss_fn,
        self.client_optimizer,
        data,
        index_row,
        count,
        key,
        schedule,
      )
      return params

    tuned = self.client_map(finetune, (0, 0, 0), data.train_index, data.train_count, keys)
    if self.fine_tunes.all():
      return tuned
    keep = jnp.asarray(self.fine_tunes)
    return jax.tree.map(
      lambda t, g: jnp.where(keep.reshape((-1,) + (1,) * g.ndim), t, g[None]), tuned, server.params
    )
