"""Asynchronous federated learning on a virtual clock: FedAsync and FedBuff.

A host-side event simulation (numpy, deterministic in --seed) decides who trains when;
the device does the training, in ONE jitted call per server step.

Virtual clock. Client c needs `local_steps[c] * step_duration[c]` time units per job;
its step duration is drawn once from --speed_distribution (constant 1, lognormal
exp(N(0, speed_spread^2)) or a --speed_trace CSV `client,duration`). Up to
--concurrency clients train at once. Whenever a slot is free, a client is drawn
uniformly among the idle, available, non-dropped clients and starts from the current
server version. Availability: always; bernoulli (a drawn client is available with
probability --availability_p, otherwise it retries one time unit later); markov (an
on/off chain per client, on at time 0 with probability --availability_p, switching with
probability --availability_switch_p per time unit). The --dropout_clients stop at virtual
time --dropout_time (a job in flight then is lost) or, when --dropout_time < 0, start no
job once the server version reaches --dropout_round (the sync semantics); with
--rejoin_time >= 0 they come back then and start from the current server state (the
global model, and for FedGen / AP-FL the current generator, which lives there).

Events at one instant: the arrivals are taken in client-id order until the buffer is
full, then the server step happens, then free slots are refilled from the new version. The
staleness of an update is tau = (server version when it is aggregated) - (version it
started from); an update with tau > --max_staleness is dropped (and counted).

Server modes (one `server_step` = one server version = one "round" of the runner):
  fedbuff: K = --buffer_size accepted arrivals, then the algorithm's own
    `server_update` on them with each delta scaled by s(tau) and the weights of its
    (normalised) weighted mean set to 1 (--fedbuff_weighting=uniform) or left at the
    examples (examples): the server optimizer applies
      uniform:  (1/K) sum_k s(tau_k) delta_k             (FedBuff, Algorithm 1)
      examples: sum_k n_k s(tau_k) delta_k / sum_k n_k   (FLSim's linear example weight
                                                          relative to the buffer's mean)
    so a stale buffer takes a shorter step (with server sgd at --server_learning_rate
    eta: x <- x + eta * mean). FedGen / AP-FL also train their generator on the buffer,
    with teachers = current model + s(tau) x stale delta.
  fedasync: K = 1, x <- (1 - a) x + a x_client with a = --server_mixing * s(tau) and
    x_client = (start version's params) + delta. The algorithm's `server_update` still
    runs, on the update x_client - x, with its mean-update step (`apply_mean_update`)
    replaced by the mixing x + a (x_client - x) (the server optimizer is not used and its
    state is kept): so FedGen's / AP-FL's generator is taught by the model the server holds
    after the step (the mixture) as the global teacher, and by x_client (= x + the update)
    as the client teacher. An algorithm whose `server_update` does not go through
    `apply_mean_update` gets its params replaced by the mixture afterwards. Each arrival
    can depend on the previous server step, so fedasync trains one client per jitted call.
    With --fedasync_rho > 0 the client optimizer is chained after
    `fedprox.proximal_gradient(rho)`: the model sent to the server minimises
    f(x) + rho/2 ||x - x_tau||^2 around its start version x_tau (FedAsync's local
    objective); personal models train without it: Ditto's, APFL-Deng's and AP-FL's
    theta_local use their own `personal_optimizer`, which the wrapper leaves alone.

Vectorisation. Training is a pure function of (start server state, client state, key),
so an update is computed when it ARRIVES, from the version it STARTED on: the device
keeps the server states of the last --max_staleness + 1 versions in a ring (version v
in slot v % R), gathers each buffered client's start state and maps `client_update`
over the buffer with the server state on axis 0, through the algorithm's client map and
in the same size groups as a sync round (`Algorithm.map_client_updates`). Every call has
the same shapes, so the step compiles once, or twice when some buffer repeats a client
beyond the size groups' step bounds (that buffer trains in one lockstep group).
Keys: the i-th arrival (i = 0, 1, ...) of client c within a server step trains with
fold_in(client_rng, c + i * num_clients), where client_rng is the first half of
split(step rng) as in `Algorithm.run_round`; so fedbuff with the whole federation in the
buffer and no staleness computes exactly the synchronous round. Client states are
scattered back after the step (a client's last arrival in the buffer wins); an algorithm
whose `client_update` reads the client state sees, for a client arriving twice in one
buffer, the state from before the buffer.

Checkpointing. `AsyncState.device` is a pytree (save it with orbax) and
`AsyncState.clock.to_json()` is the whole host state, random generator included;
`Clock.from_json` restores it, after which the run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import base
from apfl_jax.algorithms.fedprox import proximal_gradient
from apfl_jax.asynchrony.clock import CLOCK_STREAM, Clock, Job, staleness_weight, step_durations
from apfl_jax.core import local_training, sharding
from apfl_jax.core.errors import ConfigError

if TYPE_CHECKING:
  from apfl_jax.config.config import Config


def _delta(update: Any) -> Any:
  """The parameter change of a client update (FedGen / AP-FL send {'delta': ..., ...})."""
  return update['delta'] if isinstance(update, dict) and 'delta' in update else update


def _replace_delta(update: Any, delta: Any) -> Any:
  """`update` with its parameter change replaced by `delta`."""
  if isinstance(update, dict) and 'delta' in update:
    return {**update, 'delta': delta}
  return delta


def with_proximal_client_optimizer(algorithm: base.Algorithm, rho: float) -> base.Algorithm:
  """A copy of `algorithm` whose client optimizer adds FedAsync's proximal gradient.

  The client optimizer's state starts fresh from the model a client starts from (the
  server version x_tau), so chaining `proximal_gradient(rho)` before it trains that model
  on f(x) + rho/2 ||x - x_tau||^2 (FedAsync, Xie et al. 2019, Algorithm 1).

  Raises:
    ConfigError: the algorithm has no client optimizer.
  """
  if not hasattr(algorithm, 'client_optimizer'):
    raise ConfigError(
      f'--fedasync_rho needs an algorithm with a client optimizer; '
      f'{type(algorithm).__name__} has none'
    )
  clone = copy.copy(algorithm)
  clone.client_optimizer = optax.chain(
    proximal_gradient(rho), local_training.as_transformation(algorithm.client_optimizer)
  )
  return clone


def fedasync_mixing(algorithm: base.Algorithm, mixing: jax.Array) -> base.Algorithm:
  """A copy of `algorithm` whose mean-update step is FedAsync's mixing.

  Its `apply_mean_update(params, opt_state, deltas, weights)` returns
  (params + mixing * deltas[0], opt_state) for the one arrival's delta x_client - x: the
  mixture (1 - mixing) x + mixing x_client, the server optimizer untouched. The copy is
  made while tracing (`mixing` may be traced); an algorithm without `apply_mean_update`
  is returned as it is.
  """
  if not hasattr(algorithm, 'apply_mean_update'):
    return algorithm

  def apply_mean_update(params, opt_state, deltas, weights):
    del weights
    return jax.tree.map(lambda x, d: x + mixing * d[0], params, deltas), opt_state

  clone = copy.copy(algorithm)
  clone.apply_mean_update = apply_mean_update
  return clone


@flax.struct.dataclass
class AsyncDeviceState:
  """The device part of an asynchronous run (a pytree: checkpoint it with orbax).

  Attributes:
    servers: the server states of the last R = max_staleness + 1 versions, stacked on a
      leading [R] axis; version v is in slot v % R.
    clients: the algorithm's per-client state (leading axis num_clients).
    version: int32 scalar, the current server version.
  """

  servers: Any
  clients: Any
  version: jax.Array


@dataclasses.dataclass(frozen=True)
class AsyncState:
  """A whole asynchronous run: device pytree plus host clock."""

  device: AsyncDeviceState
  clock: Clock


class AsyncSimulator:
  """FedAsync / FedBuff on a virtual clock around any `base.Algorithm`."""

  def __init__(
    self,
    algorithm: base.Algorithm,
    config: Config,
    num_clients: int,
    local_steps_per_client: Any,
    dropout_clients: tuple[int, ...] = (),
  ):
    """Builds the simulator.

    Args:
      algorithm: the federated algorithm.
      config: the experiment config (its --server must be fedasync or fedbuff).
      num_clients: clients in the federation.
      local_steps_per_client: [num_clients] local steps of each client per job (see
        `client_step_counts`).
      dropout_clients: ids of the clients that drop out.

    Raises:
      ConfigError: naming the flag whose value cannot be simulated.
    """
    if config.server not in ('fedasync', 'fedbuff'):
      raise ConfigError(f'--server={config.server} is not asynchronous: use fedasync or fedbuff')
    steps = np.asarray(local_steps_per_client, np.float64)
    if steps.shape != (num_clients,):
      raise ValueError(f'local_steps_per_client has shape {steps.shape}, expected ({num_clients},)')
    if config.availability == 'bernoulli' and config.availability_p <= 0:
      raise ConfigError('--availability_p must be > 0 with --availability=bernoulli')
    if (
      config.availability == 'markov'
      and config.availability_switch_p <= 0
      and config.availability_p <= 0
    ):
      raise ConfigError(
        '--availability=markov with --availability_p=0 and '
        '--availability_switch_p=0: no client is ever available'
      )
    if 0 <= config.rejoin_time < config.dropout_time:
      raise ConfigError(
        f'--rejoin_time={config.rejoin_time} is before --dropout_time={config.dropout_time}'
      )
    self.algorithm = algorithm
    if config.server == 'fedasync' and config.fedasync_rho > 0:
      self.algorithm = with_proximal_client_optimizer(algorithm, config.fedasync_rho)
    self.config = config
    self.num_clients = num_clients
    self.buffer_size = config.buffer_size if config.server == 'fedbuff' else 1
    self.concurrency = min(
      num_clients, config.concurrency or max(1, int(round(config.join_ratio * num_clients)))
    )
    self.ring_size = config.max_staleness + 1
    self.durations = steps * step_durations(config, num_clients)
    self.dropout = np.zeros((num_clients,), bool)
    self.dropout[list(dropout_clients)] = True
    # The jitted device part of a server step (size_groups static: one compilation each).
    self.device_step = jax.jit(self._device_step, static_argnames='size_groups')

  def init(self, state: base.AlgorithmState) -> AsyncState:
    """The asynchronous run starting from `state` at virtual time 0, version 0."""
    if self.config.server == 'fedasync' and not (
      hasattr(state.server, 'params') and hasattr(state.server, 'opt_state')
    ):
      raise ConfigError(
        f'--server=fedasync needs a global model; --algorithm={self.config.algorithm} has none'
      )
    servers = jax.tree.map(
      lambda x: jnp.repeat(jnp.asarray(x)[None], self.ring_size, 0), state.server
    )
    device = AsyncDeviceState(
      servers=servers, clients=state.clients, version=jnp.zeros((), jnp.int32)
    )
    n, config = self.num_clients, self.config
    rng = np.random.default_rng([config.seed, CLOCK_STREAM])
    online, next_switch = np.ones((n,), bool), np.full((n,), math.inf)
    if config.availability == 'markov':
      online = rng.random(n) < config.availability_p
      if config.availability_switch_p > 0:
        next_switch = rng.geometric(config.availability_switch_p, n).astype(np.float64)
    clock = Clock(
      time=0.0,
      version=0,
      jobs=[],
      rng_state=dict(rng.bit_generator.state),
      unavailable_until=np.zeros((n,)),
      online=online,
      next_switch=next_switch,
      dropped_stale=0,
    )
    return AsyncState(device=device, clock=clock)

  def server_step(
    self, state: AsyncState, rng: jax.Array, data: Any
  ) -> tuple[AsyncState, dict[str, Any]]:
    """Advances the clock to the next server step and performs it.

    Args:
      state: the run's state (not modified).
      rng: this server step's key (e.g. fold_in(seed key, new version)).
      data: all clients' data (FederatedData).

    Returns:
      (new state, metrics): virtual_time (of the step), server_version (after it),
      clients (ids, arrival order), arrival_times, staleness (per client),
      staleness_mean, dropped_stale (this step), loss and finite (numpy, per client).
    """
    clock = copy.deepcopy(state.clock)
    generator = np.random.default_rng()
    generator.bit_generator.state = clock.rng_state
    arrivals, dropped = self._collect(clock, generator)
    clock.rng_state = generator.bit_generator.state
    clock.dropped_stale += dropped
    clients = np.asarray([j.client for j in arrivals], np.int32)
    tau = np.asarray([clock.version - j.start_version for j in arrivals])
    scale = staleness_weight(
      tau,
      self.config.staleness_function,
      self.config.staleness_exponent,
      self.config.staleness_hinge_b,
    )
    if self.config.server == 'fedasync':
      scale = scale * self.config.server_mixing
    occurrence = np.asarray([np.sum(clients[:i] == c) for i, c in enumerate(clients)])
    is_last = np.asarray([not np.any(clients[i + 1 :] == c) for i, c in enumerate(clients)])
    slots = np.asarray([j.start_version % self.ring_size for j in arrivals], np.int32)
    device, round_metrics = self.device_step(
      state.device,
      clients,
      (clients + self.num_clients * occurrence).astype(np.int32),
      np.where(is_last, clients, self.num_clients).astype(np.int32),
      slots,
      scale.astype(np.float32),
      rng,
      data,
      size_groups=self.algorithm.schedule.fits_buckets(np.asarray(data.train_count)[clients]),
    )
    clock.version += 1
    loss, finite = sharding.to_host((round_metrics.loss, round_metrics.finite))  # multi-process
    metrics = {
      'virtual_time': clock.time,
      'server_version': clock.version,
      'clients': clients.tolist(),
      'arrival_times': [j.finish_time for j in arrivals],
      'staleness': tau.tolist(),
      'staleness_mean': float(tau.mean()),
      'dropped_stale': dropped,
      'loss': loss,
      'finite': finite,
    }
    return AsyncState(device=device, clock=clock), metrics

  def algorithm_state(self, state: AsyncState) -> base.AlgorithmState:
    """The current server state and client states, e.g. for evaluation."""
    slot = state.clock.version % self.ring_size
    return base.AlgorithmState(
      server=jax.tree.map(lambda r: r[slot], state.device.servers), clients=state.device.clients
    )

  def _device_step(
    self,
    device: AsyncDeviceState,
    clients: jax.Array,
    key_ids: jax.Array,
    scatter_ids: jax.Array,
    slots: jax.Array,
    scale: jax.Array,
    rng: jax.Array,
    data: Any,
    size_groups: bool,
  ) -> tuple[AsyncDeviceState, base.RoundMetrics]:
    """One server step on the buffered arrivals (all arguments have fixed shapes).

    Args:
      device: the device state.
      clients: int32 [K] client of each arrival.
      key_ids: int32 [K] what each arrival's key folds into the client key.
      scatter_ids: int32 [K] where each new client state goes (num_clients: nowhere).
      slots: int32 [K] ring slot of each arrival's start version.
      scale: float32 [K] s(tau) (fedbuff) or server_mixing * s(tau) (fedasync).
      rng: the step's key.
      data: all clients' data.
      size_groups: train in the schedule's size groups (static; False when the buffer
        repeats a client beyond the groups' step bounds).

    Returns:
      (new device state, per-arrival loss and finiteness).
    """
    client_rng, server_rng = jax.random.split(rng)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(client_rng, key_ids)
    starts = jax.tree.map(lambda r: r[slots], device.servers)
    current = jax.tree.map(lambda r: r[device.version % self.ring_size], device.servers)
    new_clients, outputs = self.algorithm.map_client_updates(
      starts, 0, base.gather_clients(device.clients, clients), clients, keys, data, size_groups
    )
    if self.config.server == 'fedbuff':
      server = self.algorithm.server_update(
        current, self._fedbuff_outputs(outputs, scale), server_rng
      )
    else:
      server = self._mix(current, starts, outputs, scale[0], server_rng)
    version = device.version + 1
    servers = jax.tree.map(
      lambda r, s: r.at[version % self.ring_size].set(s), device.servers, server
    )
    client_states = jax.tree.map(
      lambda x, v: x.at[scatter_ids].set(v, mode='drop'), device.clients, new_clients
    )
    return AsyncDeviceState(
      servers=servers, clients=client_states, version=version
    ), base.RoundMetrics(loss=outputs.loss, finite=outputs.finite)

  def _fedbuff_outputs(self, outputs: base.ClientOutput, staleness: jax.Array) -> base.ClientOutput:
    """The buffer as the algorithm's weighted mean must see it to take FedBuff's step.

    Args:
      outputs: the K buffered outputs, stacked.
      staleness: float32 [K] s(tau) of each.

    Returns:
      The outputs with each delta scaled by its s(tau) and num_examples set to 1
      (uniform) or kept (examples), so that the normalised mean is the mean of the
      module docstring and s(tau) does not cancel out.
    """
    scaled = _replace_delta(
      outputs.update,
      jax.tree.map(
        lambda d: d * staleness.reshape((-1,) + (1,) * (d.ndim - 1)), _delta(outputs.update)
      ),
    )
    weights = (
      outputs.num_examples
      if self.config.fedbuff_weighting == 'examples'
      else jnp.ones_like(outputs.num_examples)
    )
    return dataclasses.replace(outputs, update=scaled, num_examples=weights)

  def _mix(
    self, current: Any, starts: Any, outputs: base.ClientOutput, mixing: jax.Array, rng: jax.Array
  ) -> Any:
    """FedAsync: (1 - mixing) x + mixing x_client for the one arrival (leading axis 1).

    The algorithm's `server_update` sees the update x_client - x and, through
    `fedasync_mixing`, moves its params to the mixture before any other server work (a
    generator's global teacher is the mixture, not x_client).
    """
    towards = jax.tree.map(
      lambda s, d, x: s + d - x[None], starts.params, _delta(outputs.update), current.params
    )
    server = fedasync_mixing(self.algorithm, mixing).server_update(
      current, dataclasses.replace(outputs, update=_replace_delta(outputs.update, towards)), rng
    )
    params = jax.tree.map(lambda x, d: x + mixing * d[0], current.params, towards)
    return server.replace(params=params, opt_state=current.opt_state)

  def _collect(self, clock: Clock, rng: np.random.Generator) -> tuple[list[Job], int]:
    """Runs the events until the buffer is full.

    Returns:
      (the buffered jobs in arrival order, updates dropped for staleness).
    """
    buffer: list[Job] = []
    dropped = 0
    while len(buffer) < self.buffer_size:
      self._fill(clock, rng)
      finish = min((j.finish_time for j in clock.jobs), default=math.inf)
      wake = self._wake_time(clock) if len(clock.jobs) < self.concurrency else math.inf
      if math.isinf(min(finish, wake)):
        raise ConfigError(
          'no client can ever start training: check --availability, '
          '--availability_p, --availability_switch_p and --dropout_clients'
        )
      if wake < finish:
        clock.time = wake
        continue
      clock.time = finish
      for job in sorted((j for j in clock.jobs if j.finish_time == finish), key=lambda j: j.client):
        if len(buffer) == self.buffer_size:
          break
        clock.jobs.remove(job)
        if job.cancelled:
          continue
        if clock.version - job.start_version > self.config.max_staleness:
          dropped += 1
        else:
          buffer.append(job)
    return buffer, dropped

  def _fill(self, clock: Clock, rng: np.random.Generator) -> None:
    """Starts clients on the free slots at the current time."""
    config, t = self.config, clock.time
    if config.availability == 'markov':
      while True:
        due = np.flatnonzero(clock.next_switch <= t)
        if not due.size:
          break
        clock.online[due] = ~clock.online[due]
        clock.next_switch[due] += rng.geometric(config.availability_switch_p, due.size)
    while len(clock.jobs) < self.concurrency:
      candidates = np.flatnonzero(
        self._idle_eligible(clock) & (clock.unavailable_until <= t) & clock.online
      )
      if not candidates.size:
        return
      client = int(rng.choice(candidates))
      if config.availability == 'bernoulli' and rng.random() >= config.availability_p:
        clock.unavailable_until[client] = t + 1.0
        continue
      finish = t + float(self.durations[client])
      cancelled = bool(self.dropout[client] and t < config.dropout_time < finish)
      clock.jobs.append(
        Job(
          client=client,
          start_version=clock.version,
          finish_time=config.dropout_time if cancelled else finish,
          cancelled=cancelled,
        )
      )

  def _idle_eligible(self, clock: Clock) -> np.ndarray:
    """[num_clients] bool: not training and not dropped out now."""
    config, t = self.config, clock.time
    idle = np.ones((self.num_clients,), bool)
    idle[[j.client for j in clock.jobs]] = False
    if config.dropout_time >= 0:
      gone = t >= config.dropout_time
    else:
      gone = clock.version >= config.dropout_round
    if 0 <= config.rejoin_time <= t:
      gone = False
    return idle & ~(self.dropout & gone)

  def _wake_time(self, clock: Clock) -> float:
    """The next time an idle client may become available or eligible (inf: never)."""
    t, idle = clock.time, self._idle_eligible(clock)
    times = [
      clock.unavailable_until[idle & (clock.unavailable_until > t)],
      clock.next_switch[idle & ~clock.online],
    ]
    if self.config.rejoin_time > t and np.any(self.dropout):
      times.append(np.asarray([self.config.rejoin_time]))
    return float(min((x.min() for x in times if x.size), default=math.inf))
