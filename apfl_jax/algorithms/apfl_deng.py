"""APFL (Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning", 2020,
arXiv 2003.13461); not to be confused with this project's AP-FL (`apfl.py`).

Client k keeps a personal model v_k and a mixing weight alpha_k (initially
--apfl_deng_alpha; v_k starts as the initial global model). In a round it starts its
local copy w of the global model and, at every local step on a batch xi, takes the three
simultaneous steps of the paper's Algorithm 1 at the current (w, v, alpha):

  v_bar = alpha * v + (1 - alpha) * w
  w     <- w - lr * grad_w L(w; xi)
  v     <- v - lr * grad_v L(v_bar; xi)              (= alpha * grad L at v_bar)
  alpha <- clip(alpha - lr_alpha * <v - w, grad L(v_bar; xi)>, 0, 1)

(w and v step through the client optimizer, each with its own fresh state; alpha takes a
plain SGD step of the exact gradient, without the 0.02 * alpha term FedTorch and PFLlib
add.) The client sends w - w_global and the server averages as in FedAvg; the loss it
reports is that of w. A padded step changes nothing, as in `local_training`; with the same
key the w-part is exactly FedAvg's local training.

Personalized model: v_bar_k = alpha_k * v_k + (1 - alpha_k) * w_global with the current
global model, which is the paper's output (at a synchronisation every w_k equals the
averaged model). PFLlib instead evaluates the mix with the client's own last local w.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import base, registry
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.core import local_training, options


@flax.struct.dataclass
class APFLDengClient:
  """Per-client personal model v_k and mixing weight alpha_k (stacked over clients)."""

  params: Any
  alpha: jax.Array


@flax.struct.dataclass
class _StepState:
  """Carry of the joint local-training scan."""

  w: Any
  v: Any
  alpha: jax.Array
  w_opt: Any
  v_opt: Any
  loss_sum: jax.Array
  steps: jax.Array


def mix(v: base.Params, w: base.Params, alpha: jax.Array) -> base.Params:
  """alpha * v + (1 - alpha) * w, leaf by leaf."""
  return jax.tree.map(lambda a, b: alpha * a + (1.0 - alpha) * b, v, w)


@dataclasses.dataclass(frozen=True)
class APFLDengOptions(options.Options):
  """APFL (Deng et al.)'s flags."""

  TITLE = 'APFL (Deng et al. 2020)'
  apfl_deng_alpha: float = options.option(
    0.5,
    'APFL (Deng et al.): initial mixing weight alpha of each client.',
    check=options.unit_interval,
  )


@registry.register('apfl_deng', options=APFLDengOptions)
class APFLDeng(FedAvg):
  """FedAvg plus a personal model per client mixed with the global one by a learned alpha."""

  personalized_axis = 0

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    alpha: float,
    alpha_learning_rate: float,
    num_clients: int,
  ):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    # v's own handle on the optimizer, so that a wrapper of w's `client_optimizer`
    # (FedAsync's proximal term) leaves it alone.
    self.personal_optimizer = client_optimizer
    self.alpha = alpha
    self.alpha_learning_rate = alpha_learning_rate
    self.num_clients = num_clients

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> APFLDeng:
    """APFL with alpha_k initially config.apfl_deng_alpha, learned at config.learning_rate."""
    return cls(
      *context.fedavg_args(),
      config.apfl_deng_alpha,
      config.learning_rate,
      np.asarray(context.partition.train_counts).shape[0],
    )

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    fedavg = super().init(rng)
    personal = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), fedavg.server.params
    )
    return base.AlgorithmState(
      server=fedavg.server,
      clients=APFLDengClient(
        params=personal, alpha=jnp.full((self.num_clients,), self.alpha, jnp.float32)
      ),
    )

  def _step(self, state: _StepState, images, labels, example_mask, rng) -> _StepState:
    """One joint step of (w, v, alpha)."""

    def objective(w, v, alpha):
      global_loss = self.loss_fn(w, images, labels, example_mask, rng)
      mixed = mix(v, jax.lax.stop_gradient(w), alpha)
      return global_loss + self.loss_fn(mixed, images, labels, example_mask, rng), global_loss

    (_, loss), (w_grad, v_grad, alpha_grad) = jax.value_and_grad(
      objective, argnums=(0, 1, 2), has_aux=True
    )(state.w, state.v, state.alpha)
    w_updates, w_opt = self.client_optimizer.update(w_grad, state.w_opt, state.w)
    v_updates, v_opt = self.personal_optimizer.update(v_grad, state.v_opt, state.v)
    return _StepState(
      w=optax.apply_updates(state.w, w_updates),
      v=optax.apply_updates(state.v, v_updates),
      alpha=jnp.clip(state.alpha - self.alpha_learning_rate * alpha_grad, 0.0, 1.0),
      w_opt=w_opt,
      v_opt=v_opt,
      loss_sum=state.loss_sum + loss,
      steps=state.steps + 1,
    )

  def client_update(self, server, client, index_row, count, rng, data):
    start = _StepState(
      w=server.params,
      v=client.params,
      alpha=client.alpha,
      w_opt=self.client_optimizer.init(server.params),
      v_opt=self.personal_optimizer.init(client.params),
      loss_sum=jnp.zeros((), jnp.float32),
      steps=jnp.zeros((), jnp.int32),
    )
    state = local_training.run_local_steps(
      start, self._step, data, index_row, count, rng, self.schedule
    )
    loss = state.loss_sum / jnp.maximum(state.steps, 1)
    return APFLDengClient(params=state.v, alpha=state.alpha), base.ClientOutput(
      update=jax.tree.map(jnp.subtract, state.w, server.params),
      num_examples=count.astype(jnp.float32),
      loss=loss,
      finite=base.all_finite(state.w, state.v, state.alpha, loss),
    )

  def personalized_params(self, state, data):
    return self.client_map(
      mix, (0, None, 0), state.clients.params, state.server.params, state.clients.alpha
    )
