"""The functional interface every federated algorithm implements.

An algorithm is an immutable object holding static things (the model, optimizers,
hyper-parameters); its methods are pure functions of explicit state:

  init(rng) -> AlgorithmState
  client_update(server, client, index_row, count, rng, data) -> (client, ClientOutput)
  server_update(server, outputs, rng) -> server
  personalized_params(state, data) -> params   # stacked per client if personalized_axis == 0
  global_params(state) -> params | None
  unseen_class_params(state, data) -> params | None   # the model scored on classes no
                                       # active client holds (default: the global model)
  unseen_class_control_params(state, data) -> params | None   # the same probe with
        # one-hot class codes, no semantic information (default None: no control)
  label_prior_free_params(state, data, client_ids) -> params | None   # personalized
        # models of those clients built without knowing their label set (None: the
        # algorithm's personalized models never use it)

`run_round` composes them: the cohort's `client_update`s run over stacked client states
through the algorithm's client map (`apfl_jax.core.cohort`: one vmapped call, chunks, or a
device mesh; one call per size group in epoch mode: see `map_client_updates`), then one
`server_update`. The runner jits `run_round` once; an
algorithm with extra server work (a generator, friend models) overrides `run_round` and
keeps the same signature.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from apfl_jax.core.cohort import ClientMap
from apfl_jax.core.local_training import Params, masked_cross_entropy
from apfl_jax.data.client_data import FederatedData


@flax.struct.dataclass
class AlgorithmState:
  """State of a whole federation.

  Attributes:
    server: the server's pytree (global model, optimizer state, generator, ...).
    clients: a pytree whose leaves have a leading [num_clients] axis (per-client
      persistent state; an empty tuple when clients keep nothing between rounds).
  """

  server: Any
  clients: Any


@flax.struct.dataclass
class ClientOutput:
  """What one client sends back after a round.

  Attributes:
    update: the client's contribution (e.g. trained params minus the start params).
    num_examples: float32 weight of the contribution (its training examples).
    loss: mean local training loss.
    finite: False when the client's loss or params hold NaN or Inf.
  """

  update: Params
  num_examples: jax.Array
  loss: jax.Array
  finite: jax.Array


@flax.struct.dataclass
class RoundMetrics:
  """Per-cohort-client diagnostics of one round (leading axis: cohort)."""

  loss: jax.Array
  finite: jax.Array


def all_finite(*trees: Any) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def weighted_mean(stacked: Params, weights: jax.Array) -> Params:
  """Mean over the leading axis weighted by `weights` (normalised here)."""
  w = weights / jnp.maximum(jnp.sum(weights), 1e-12)
  return jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), stacked)


def gather_clients(tree: Any, clients: jax.Array) -> Any:
  return jax.tree.map(lambda x: x[clients], tree)


def scatter_clients(tree: Any, clients: jax.Array, values: Any) -> Any:
  return jax.tree.map(lambda x, v: x.at[clients].set(v), tree, values)


class Algorithm:
  """Base class; subclasses implement the methods named in the module docstring.

  Attributes:
    personalized_axis: 0 when `personalized_params` returns one model per client
      (stacked), None when every client uses the same model.
    client_map: how per-client functions run over a cohort (vmap, chunks, a mesh);
      see `apfl_jax.core.cohort`. Set with `with_client_map`.
  """

  personalized_axis: int | None = None
  client_map: ClientMap = ClientMap()
  schedule: Any = None

  @classmethod
  def from_config(cls, config: Any, context: Any) -> Algorithm:
    """Builds the algorithm from the config and a `registry.BuildContext`."""
    raise NotImplementedError

  def init(self, rng: jax.Array) -> AlgorithmState:
    raise NotImplementedError

  def client_update(
    self,
    server: Any,
    client: Any,
    index_row: jax.Array,
    count: jax.Array,
    rng: jax.Array,
    data: FederatedData,
  ) -> tuple[Any, ClientOutput]:
    raise NotImplementedError

  def server_update(self, server: Any, outputs: ClientOutput, rng: jax.Array) -> Any:
    raise NotImplementedError

  def personalized_params(self, state: AlgorithmState, data: FederatedData) -> Params:
    raise NotImplementedError

  def global_params(self, state: AlgorithmState) -> Params | None:
    raise NotImplementedError

  def unseen_class_params(self, state: AlgorithmState, data: FederatedData) -> Params | None:
    return self.global_params(state)

  def unseen_class_control_params(
    self, state: AlgorithmState, data: FederatedData
  ) -> Params | None:
    del state, data
    return None

  def label_prior_free_params(
    self, state: AlgorithmState, data: FederatedData, client_ids: jax.Array
  ) -> Params | None:
    del state, data, client_ids
    return None

  def train_cohort(
    self, server: Any, clients: Any, cohort: jax.Array, rng: jax.Array, data: FederatedData
  ) -> tuple[Any, ClientOutput]:
    """Runs `client_update` for the cohort from one server state.

    Each client's key is `fold_in(rng, client_id)`, so a client's training does not
    depend on which other clients are in the cohort (see `map_client_updates`).

    Returns:
      (the cohort's new client states, their outputs), stacked over the cohort.
    """
    keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(cohort)
    return self.map_client_updates(
      server, None, gather_clients(clients, cohort), cohort, keys, data
    )

  def map_client_updates(
    self,
    server: Any,
    server_axis: int | None,
    clients: Any,
    ids: jax.Array,
    keys: jax.Array,
    data: FederatedData,
    size_groups: bool = True,
  ) -> tuple[Any, ClientOutput]:
    """`client_update` of every client in `ids`, through `self.client_map`.

    With `schedule.buckets` giving several groups (epoch mode, uneven clients) and
    `size_groups`, the clients are sorted by example count and each group is one
    client-map call that scans only its own group's steps; the results are put back
    in the order of `ids`. A client's steps and batches are the same either way; only
    masked padding steps are skipped. The groups' step bounds hold when `ids` has no
    repeated client (`Schedule.fits_buckets` checks a host-side cohort).

    Args:
      server: the server state every client starts from (server_axis None), or one
        per client stacked on axis 0 (server_axis 0, e.g. stale versions).
      server_axis: None or 0, as above.
      clients: the clients' states, stacked in the order of `ids`.
      ids: int32 [K] client ids.
      keys: [K] the clients' keys.
      data: all clients' data.
      size_groups: False runs one lockstep group whatever the schedule.

    Returns:
      (the new client states, their outputs), stacked in the order of `ids`.
    """

    def train(algorithm, servers, states, group_ids, group_keys):
      return self.client_map(
        algorithm.client_update,
        (server_axis, 0, 0, 0, 0, None),
        servers,
        states,
        data.train_index[group_ids],
        data.train_count[group_ids],
        group_keys,
        data,
      )

    buckets = self.schedule.buckets(ids.shape[0])
    if len(buckets) == 1 or not size_groups:
      return train(self, server, clients, ids, keys)
    order = jnp.argsort(-data.train_count[ids], stable=True)
    parts = []
    for start, end, schedule in buckets:
      part = order[start:end]
      servers = server if server_axis is None else gather_clients(server, part)
      parts.append(
        train(
          self.with_schedule(schedule),
          servers,
          gather_clients(clients, part),
          ids[part],
          keys[part],
        )
      )
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return jax.tree.map(lambda x: x[jnp.argsort(order)], joined)

  def with_client_map(self, client_map: ClientMap) -> 'Algorithm':
    """A copy of this algorithm whose per-client work runs through `client_map`."""
    clone = copy.copy(self)
    clone.client_map = client_map
    return clone

  def with_schedule(self, schedule: Any) -> 'Algorithm':
    """A copy of this algorithm whose local training follows `schedule`."""
    clone = copy.copy(self)
    clone.schedule = schedule
    return clone

  def run_round(
    self, state: AlgorithmState, cohort: jax.Array, rng: jax.Array, data: FederatedData
  ) -> tuple[AlgorithmState, RoundMetrics]:
    """One synchronous round: the cohort trains (`train_cohort`), then the server.

    Args:
      state: the federation's state.
      cohort: int32 [K] ids of the clients that train this round.
      rng: this round's key.
      data: all clients' data.

    Returns:
      (new state, per-cohort-client metrics).
    """
    client_rng, server_rng = jax.random.split(rng)
    new_clients, outputs = self.train_cohort(state.server, state.clients, cohort, client_rng, data)
    server = self.server_update(state.server, outputs, server_rng)
    clients = scatter_clients(state.clients, cohort, new_clients)
    return AlgorithmState(server=server, clients=clients), RoundMetrics(
      loss=outputs.loss, finite=outputs.finite
    )


def init_model_params(model: Any, rng: jax.Array, image_shape: tuple[int, ...]) -> Params:
  """Initial parameters of `model` for inputs of shape image_shape (H, W, C)."""
  return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))['params']


def classification_loss(model: Any):
  """The masked cross-entropy loss of `model`, in the LossFn signature of local training."""

  def loss_fn(params, images, labels, example_mask, rng):
    del rng
    logits = model.apply({'params': params}, images)
    return masked_cross_entropy(logits, labels, example_mask)

  return loss_fn
