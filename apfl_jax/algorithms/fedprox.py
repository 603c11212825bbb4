"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg whose clients minimise a proximal objective around the global model w_g they
started from:

  h_k(w) = L_k(w) + mu / 2 * ||w - w_g||^2,

which keeps heterogeneous clients from drifting far from w_g. With the client's SGD this
is PFLlib's perturbed gradient step w <- w - lr * (grad L_k(w) + mu * (w - w_g)); mu = 0
is exactly FedAvg. Aggregation is FedAvg's, and the personalized model is the global one
(as PFLlib reports it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from apfl_jax.algorithms import base, registry
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.core import local_training, options


def proximal_term(params: base.Params, anchor: base.Params, strength: float) -> jax.Array:
  """strength / 2 * ||params - anchor||^2 over all leaves."""
  squares = [
    jnp.sum(jnp.square(p - a)) for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor))
  ]
  return 0.5 * strength * sum(squares, jnp.zeros(()))


def proximal_loss(
  loss_fn: local_training.LossFn, anchor: base.Params, strength: float
) -> local_training.LossFn:
  """loss_fn plus strength / 2 * ||params - anchor||^2 (the anchor gets no gradient)."""
  anchor = jax.lax.stop_gradient(anchor)

  def loss(params, images, labels, example_mask, rng):
    return loss_fn(params, images, labels, example_mask, rng) + proximal_term(
      params, anchor, strength
    )

  return loss


class ProximalState(NamedTuple):
  """State of `proximal_gradient`: the parameters the optimizer was initialised at."""

  anchor: base.Params


def proximal_gradient(strength: float) -> optax.GradientTransformation:
  """Adds strength * (params - anchor) to the gradient, the anchor being the init params.

  Chained before an optimizer whose state starts fresh with each local training (as
  `local_training.client_init` does), it trains on loss + strength / 2 * ||w - w_0||^2
  with w_0 the starting point, exactly, for any optimizer (the term's gradient is added
  before the optimizer sees the gradient); the reported loss does not include the term.

  Args:
    strength: the proximal weight (FedAsync's rho).

  Returns:
    The transformation.
  """

  def init(params):
    return ProximalState(anchor=params)

  def update(updates, state, params):
    return jax.tree.map(
      lambda g, p, a: g + strength * (p - a), updates, params, state.anchor
    ), state

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class FedProxOptions(options.Options):
  """FedProx's flags."""

  TITLE = 'FedProx'
  fedprox_mu: float = options.option(
    0.01,
    'FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2.',
    check=options.non_negative,
  )


@registry.register('fedprox', options=FedProxOptions)
class FedProx(FedAvg):
  """FedAvg with a proximal term on the clients' loss."""

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    mu: float,
  ):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.mu = mu

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> FedProx:
    """FedProx with mu = config.fedprox_mu."""
    return cls(
      *context.fedavg_args(),
      config.fedprox_mu,
    )

  def client_update(self, server, client, index_row, count, rng, data):
    params, loss = local_training.train_client(
      server.params,
      proximal_loss(self.loss_fn, server.params, self.mu),
      self.client_optimizer,
      data,
      index_row,
      count,
      rng,
      self.schedule,
    )
    delta = jax.tree.map(jnp.subtract, params, server.params)
    return client, base.ClientOutput(
      update=delta,
      num_examples=count.astype(jnp.float32),
      loss=loss,
      finite=base.all_finite(params, loss),
    )
