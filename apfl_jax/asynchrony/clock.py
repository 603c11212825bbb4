"""The virtual clock of asynchronous runs: client speeds, jobs, staleness weights.

Client c needs `local_steps[c] * step_duration[c]` time units per job; its step duration
is drawn once from --speed_distribution (constant 1, lognormal exp(N(0, speed_spread^2))
or a --speed_trace CSV `client,duration`). `Clock` is the host-side state of the event
simulation (JSON-serialisable, random generator included) that `simulator.AsyncSimulator`
advances; `ClockOptions` declares the asynchrony flags.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from apfl_jax.core import local_training, options
from apfl_jax.core.errors import ConfigError

if TYPE_CHECKING:
  from apfl_jax.config.config import Config

SERVERS = ('sync', 'fedasync', 'fedbuff')
STALENESS_FUNCTIONS = ('constant', 'polynomial', 'hinge')
FEDBUFF_WEIGHTINGS = ('uniform', 'examples')
SPEED_DISTRIBUTIONS = ('constant', 'lognormal', 'trace')
AVAILABILITIES = ('always', 'bernoulli', 'markov')

# Streams of the host-side random draws (SeedSequence entropy beside --seed).
_SPEED_STREAM = 0xA51
CLOCK_STREAM = 0xA52


def staleness_weight(tau: Any, function: str, exponent: float, hinge_b: float) -> np.ndarray:
  """s(tau): constant 1, polynomial (tau+1)^-a, or hinge 1 if tau <= b else 1/(a(tau-b)+1)."""
  tau = np.asarray(tau, np.float64)
  if function == 'constant':
    return np.ones_like(tau)
  if function == 'polynomial':
    return (tau + 1.0) ** -exponent
  if function == 'hinge':
    return 1.0 / (exponent * np.maximum(tau - hinge_b, 0.0) + 1.0)
  raise ConfigError(f'--staleness_function: unknown value {function!r}')


def read_speed_trace(path: str, num_clients: int) -> np.ndarray:
  """Per-step durations from a CSV with the header `client,duration`, one row per client.

  Raises:
    ConfigError: naming --speed_trace when the file is unreadable or a row is bad or
      missing.
  """
  where = f'--speed_trace {path!r}'
  try:
    with open(path, newline='') as f:
      lines = [
        (n, row) for n, row in enumerate(csv.reader(f), 1) if any(cell.strip() for cell in row)
      ]
  except OSError as e:
    raise ConfigError(f'{where}: cannot read it ({e.strerror or e})') from None
  if not lines or [cell.strip() for cell in lines[0][1]] != ['client', 'duration']:
    raise ConfigError(f'{where}: the first line must be the header "client,duration"')
  durations = np.full((num_clients,), np.nan)
  for n, row in lines[1:]:
    try:
      if len(row) != 2:
        raise ValueError
      client, duration = int(row[0]), float(row[1])
    except ValueError:
      raise ConfigError(f'{where}: line {n} is not "client,duration": {",".join(row)!r}') from None
    if not 0 <= client < num_clients:
      raise ConfigError(f'{where}: line {n}: client {client} is not in [0, {num_clients})')
    if not (math.isfinite(duration) and duration > 0):
      raise ConfigError(f'{where}: line {n}: duration must be > 0, got {row[1].strip()}')
    if not np.isnan(durations[client]):
      raise ConfigError(f'{where}: line {n}: client {client} appears twice')
    durations[client] = duration
  missing = np.flatnonzero(np.isnan(durations))
  if missing.size:
    raise ConfigError(
      f'{where}: no row for client(s) {missing[:10].tolist()} '
      f'(one row per client of --num_clients={num_clients})'
    )
  return durations


def step_durations(config: Config, num_clients: int) -> np.ndarray:
  """Each client's time per local step, drawn once from --speed_distribution."""
  if config.speed_distribution == 'constant':
    return np.ones((num_clients,))
  if config.speed_distribution == 'lognormal':
    rng = np.random.default_rng([config.seed, _SPEED_STREAM])
    return np.exp(config.speed_spread * rng.standard_normal(num_clients))
  if config.speed_distribution == 'trace':
    return read_speed_trace(config.speed_trace, num_clients)
  raise ConfigError(f'--speed_distribution: unknown value {config.speed_distribution!r}')


def client_step_counts(schedule: local_training.Schedule, counts: Any) -> np.ndarray:
  """Local optimizer steps of each client per job (as `local_training.batch_plan`)."""
  counts = np.asarray(counts, np.int64)
  if schedule.local_steps > 0:
    return np.full(counts.shape, schedule.local_steps)
  return schedule.local_epochs * np.maximum(-(-counts // schedule.batch_size), 1)


@dataclasses.dataclass
class Job:
  """One client's local training in flight.

  Attributes:
    client: the client id.
    start_version: the server version it started from.
    finish_time: when its update arrives (or, if cancelled, when it is lost).
    cancelled: True when the client drops out before finishing.
  """

  client: int
  start_version: int
  finish_time: float
  cancelled: bool


@dataclasses.dataclass
class Clock:
  """The host-side state of the event simulation (JSON-serialisable).

  Attributes:
    time: current virtual time.
    version: current server version (server steps done).
    jobs: jobs in flight.
    rng_state: state of the numpy generator of the clock's draws.
    unavailable_until: [num_clients] bernoulli: a client is not drawn before this time.
    online: [num_clients] markov chain state at `time` (always True otherwise).
    next_switch: [num_clients] markov: next time the chain switches (inf: never).
    dropped_stale: updates dropped so far for staleness > --max_staleness.
  """

  time: float
  version: int
  jobs: list[Job]
  rng_state: dict[str, Any]
  unavailable_until: np.ndarray
  online: np.ndarray
  next_switch: np.ndarray
  dropped_stale: int

  def to_json(self) -> str:
    return json.dumps(
      {
        'time': self.time,
        'version': self.version,
        'jobs': [dataclasses.asdict(j) for j in self.jobs],
        'rng_state': self.rng_state,
        'unavailable_until': self.unavailable_until.tolist(),
        'online': self.online.tolist(),
        'next_switch': [t if math.isfinite(t) else None for t in self.next_switch.tolist()],
        'dropped_stale': self.dropped_stale,
      }
    )

  @classmethod
  def from_json(cls, text: str) -> 'Clock':
    d = json.loads(text)
    return cls(
      time=d['time'],
      version=d['version'],
      jobs=[Job(**j) for j in d['jobs']],
      rng_state=d['rng_state'],
      unavailable_until=np.asarray(d['unavailable_until'], np.float64),
      online=np.asarray(d['online'], bool),
      next_switch=np.asarray([math.inf if t is None else t for t in d['next_switch']], np.float64),
      dropped_stale=d['dropped_stale'],
    )


@dataclasses.dataclass(frozen=True)
class ClockOptions(options.Options):
  """The async server, its clock and client availability."""

  TITLE = 'Asynchrony'
  server: str = options.option(
    'sync',
    'Server mode: sync rounds, fedasync (mix each arriving update) or fedbuff (aggregate '
    'every --buffer_size arrivals).',
    choices=SERVERS,
  )
  buffer_size: int = options.option(
    10,
    'fedbuff: updates per server step (K).',
    check=options.positive,
  )
  concurrency: int = options.option(
    0,
    'Async: clients training at once (0 = as many as --join_ratio picks).',
    check=options.non_negative,
  )
  server_mixing: float = options.option(
    0.6,
    'fedasync: alpha in x <- (1 - alpha*s(tau)) x + alpha*s(tau) x_client.',
    check=options.unit_interval,
  )
  staleness_function: str = options.option(
    'polynomial',
    'Staleness weight s(tau): constant, polynomial (tau+1)^-a or hinge.',
    choices=STALENESS_FUNCTIONS,
  )
  staleness_exponent: float = options.option(
    0.5,
    'a of the polynomial and hinge staleness weights.',
    check=options.non_negative,
  )
  staleness_hinge_b: float = options.option(
    4.0,
    'b of the hinge staleness weight (1 while tau <= b).',
    check=options.non_negative,
  )
  max_staleness: int = options.option(
    16,
    'Async: server versions kept; an update staler than this is dropped.',
    check=options.positive,
  )
  fedbuff_weighting: str = options.option(
    'uniform',
    "fedbuff: the buffer's mean update is (1/K) sum_k s(tau_k) delta_k (uniform, "
    "FedBuff's Algorithm 1) or sum_k n_k s(tau_k) delta_k / sum_k n_k (examples, FLSim's "
    'linear example weight).',
    choices=FEDBUFF_WEIGHTINGS,
  )
  fedasync_rho: float = options.option(
    0.0,
    'fedasync: rho of the proximal term rho/2 ||x - x_tau||^2 added to the local '
    'objective of the model sent to the server (0: none).',
    check=options.non_negative,
  )
  speed_distribution: str = options.option(
    'lognormal',
    'Client compute time per local step: constant, lognormal or trace.',
    choices=SPEED_DISTRIBUTIONS,
  )
  speed_spread: float = options.option(
    1.0,
    'sigma of the log-normal step durations (0 = equal speeds).',
    check=options.non_negative,
  )
  speed_trace: str = options.option(
    '',
    'CSV file with columns client,duration (--speed_distribution=trace).',
  )
  availability: str = options.option(
    'always',
    'Client availability: always, bernoulli (--availability_p) or markov.',
    choices=AVAILABILITIES,
  )
  availability_p: float = options.option(
    0.9,
    'Probability that a client is available (bernoulli; markov start).',
    check=options.unit_interval,
  )
  availability_switch_p: float = options.option(
    0.1,
    'markov: probability of switching on<->off per time unit.',
    check=options.unit_interval,
  )
  dropout_time: float = options.option(
    -1.0,
    'Async: virtual time after which --dropout_clients stop (-1: use --dropout_round).',
  )
  rejoin_time: float = options.option(
    -1.0,
    'Async: virtual time at which dropout clients come back (-1: never).',
  )

  def check(self, config: Any) -> None:
    if self.speed_distribution == 'trace' and not os.path.isfile(self.speed_trace):
      raise ConfigError(
        f'--speed_trace: file {self.speed_trace!r} not found (needed by --speed_distribution=trace)'
      )
    if self.fedasync_rho > 0 and self.server != 'fedasync':
      raise ConfigError(
        f'--fedasync_rho={self.fedasync_rho} needs --server=fedasync, got --server={self.server}'
      )
