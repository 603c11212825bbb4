"""What the round loop drives: synchronous rounds or asynchronous server steps.

A `Driver` advances its state one step at a time and reports what the host learns
(`StepReport`); `split` / `join` turn its state into one checkpoint's device pytree and
JSON-able host part and back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from apfl_jax.asynchrony import clock, simulator
from apfl_jax.core import sharding
from apfl_jax.runner.experiment import Experiment, cohort_for_round


@dataclasses.dataclass
class StepReport:
  """What the host learns from one round (sync) or one server step (async).

  Attributes:
    clients: int [K] clients whose updates were applied.
    loss: float [K] their mean local training loss.
    finite: bool [K] False where a client's loss or params hold NaN/Inf.
    extra: more metrics for metrics.jsonl (async: virtual_time, staleness_mean, ...).
  """

  clients: np.ndarray
  loss: np.ndarray
  finite: np.ndarray
  extra: dict[str, Any]


class Driver:
  """What the round loop drives: the sync rounds or the async server steps.

  The driver's state (`tree`) is what `step` advances; `split` divides it into a device
  pytree and a JSON-able host part, saved together as one checkpoint
  (`checkpoints.save_args`), and `join` puts them back. These defaults serve a driver
  whose whole state is the algorithm's device pytree.
  """

  def init(self, state: Any) -> Any:
    """The driver's state from the algorithm's initial state."""
    return state

  def algorithm_state(self, tree: Any) -> Any:
    """The algorithm's state inside the driver's (what evaluation reads)."""
    return tree

  def split(self, tree: Any) -> tuple[Any, dict[str, Any]]:
    """(device pytree, JSON-able host part) of the driver's state."""
    return tree, {}

  def join(self, device_tree: Any, host: dict[str, Any]) -> Any:
    """Inverse of `split`."""
    del host
    return device_tree

  def step(self, tree: Any, round_index: int, rng: jax.Array) -> tuple[Any, StepReport]:
    """Runs round `round_index` (1-based)."""
    raise NotImplementedError


class SyncRounds(Driver):
  """Synchronous rounds: the cohort trains in one jitted `run_round` call per round.

  A round lasts, in virtual time, as long as its slowest client (job duration = local
  steps x that client's step duration from --speed_distribution), so sync and async runs
  can be compared at the same virtual time.
  """

  def __init__(self, experiment: Experiment):
    self._exp = experiment
    self._run_round = jax.jit(experiment.algorithm.run_round)
    config = experiment.config
    self._job_time = clock.step_durations(config, config.num_clients) * clock.client_step_counts(
      experiment.schedule, sharding.to_host(experiment.data.train_count)
    )
    self._end_times = [0.0]

  def _cohort(self, round_index: int) -> np.ndarray:
    exp, config = self._exp, self._exp.config
    dropped = exp.dropout_clients if round_index > config.dropout_round else ()
    return cohort_for_round(
      config.seed, round_index, config.num_clients, config.join_ratio, dropped
    )

  def virtual_time(self, round_index: int) -> float:
    """Virtual time at the end of `round_index` (rounds back to back)."""
    while len(self._end_times) <= round_index:
      r = len(self._end_times)
      self._end_times.append(self._end_times[-1] + float(self._job_time[self._cohort(r)].max()))
    return self._end_times[round_index]

  def step(self, state, round_index, rng):
    cohort = self._cohort(round_index)
    state, metrics = self._run_round(state, cohort, rng, self._exp.data)
    # Host reads go through `sharding.to_host`: with a mesh over several processes the
    # per-client results are split over devices this process cannot read alone.
    loss, finite = sharding.to_host((metrics.loss, metrics.finite))
    return state, StepReport(cohort, loss, finite, {'virtual_time': self.virtual_time(round_index)})


class AsyncRounds(Driver):
  """Asynchronous server steps (--server=fedasync|fedbuff): one 'round' = one server
  version. Its state is the device pytree plus the host clock (the checkpoint's host part)."""

  def __init__(self, experiment: Experiment):
    self._exp = experiment
    self._sim = simulator.AsyncSimulator(
      experiment.algorithm,
      experiment.config,
      experiment.config.num_clients,
      clock.client_step_counts(experiment.schedule, sharding.to_host(experiment.data.train_count)),
      experiment.dropout_clients,
    )

  def init(self, state):
    return self._sim.init(state)

  def split(self, async_state):
    return async_state.device, {'clock': json.loads(async_state.clock.to_json())}

  def join(self, device_tree, host):
    return simulator.AsyncState(
      device=device_tree, clock=clock.Clock.from_json(json.dumps(host['clock']))
    )

  def algorithm_state(self, async_state):
    return self._sim.algorithm_state(async_state)

  def step(self, async_state, round_index, rng):
    del round_index
    async_state, m = self._sim.server_step(async_state, rng, self._exp.data)
    extra = {
      'virtual_time': float(m['virtual_time']),
      'staleness_mean': float(m['staleness_mean']),
      'staleness': [int(t) for t in m['staleness']],
      'dropped_stale': int(async_state.clock.dropped_stale),
    }
    return async_state, StepReport(
      np.asarray(m['clients']), np.asarray(m['loss']), np.asarray(m['finite']), extra
    )
