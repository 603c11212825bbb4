"""Tests of apfl_jax.asynchrony.simulator (FedAsync, FedBuff on the virtual clock)."""

import collections

from apfl_fixtures import make_apfl, make_fedgen
from conftest import TinyModel, assert_trees_close
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.asynchrony import clock, simulator
from apfl_jax.config.config import Config
from apfl_jax.core import local_training


def make_fedavg(data):
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))
  return FedAvg(TinyModel(), (6, 6, 1), schedule, optax.sgd(0.1), optax.sgd(1.0))


def async_config(**changes):
  config = Config(
    num_clients=4,
    server='fedbuff',
    buffer_size=4,
    concurrency=4,
    speed_distribution='constant',
    staleness_function='polynomial',
    staleness_exponent=0.5,
    max_staleness=4,
    seed=0,
  )
  return config.replace(**changes)


def write_trace(tmp_path, text):
  path = tmp_path / 'speeds.csv'
  path.write_text(text)
  return str(path)


def test_fedbuff_without_staleness_equals_sync_fedavg(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  state = alg.init(jax.random.key(0))
  sim = simulator.AsyncSimulator(alg, async_config(fedbuff_weighting='examples'), 4, np.full(4, 2))
  async_state = sim.init(state)
  run_round = jax.jit(alg.run_round)
  for r in (1, 2):
    rng = jax.random.fold_in(jax.random.key(7), r)
    async_state, metrics = sim.server_step(async_state, rng, data)
    state, sync_metrics = run_round(state, jnp.arange(4, dtype=jnp.int32), rng, data)
    assert metrics['staleness'] == [0, 0, 0, 0] and sorted(metrics['clients']) == [0, 1, 2, 3]
    assert metrics['virtual_time'] == 2.0 * r and metrics['server_version'] == r
    np.testing.assert_allclose(
      metrics['loss'][np.argsort(metrics['clients'])], sync_metrics.loss, rtol=1e-5
    )
  assert_trees_close(sim.algorithm_state(async_state).server.params, state.server.params)


def test_apfl_fedbuff_without_staleness_equals_sync_round(synthetic_federation):
  """Generator, label mask and per-client local models follow the sync round."""
  _, partition, data = synthetic_federation
  alg = make_apfl(data, partition)
  state = alg.init(jax.random.key(0))
  sim = simulator.AsyncSimulator(alg, async_config(fedbuff_weighting='examples'), 4, np.full(4, 2))
  rng = jax.random.key(7)
  async_state, metrics = sim.server_step(sim.init(state), rng, data)
  state, _ = jax.jit(alg.run_round)(state, jnp.arange(4, dtype=jnp.int32), rng, data)
  assert metrics['clients'] == [0, 1, 2, 3]
  result = sim.algorithm_state(async_state)
  assert_trees_close(result.server, state.server)
  assert_trees_close(result.clients, state.clients)


def test_fedasync_mixes_each_client_model_from_its_start_version(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  state = alg.init(jax.random.key(0))
  config = async_config(server='fedasync', concurrency=2, server_mixing=0.5)
  sim = simulator.AsyncSimulator(alg, config, 4, np.ones(4))
  async_state = sim.init(state)
  run_round = jax.jit(alg.run_round)
  x0 = state.server.params
  expected = x0
  for r, tau in ((1, 0), (2, 1)):  # both clients start at version 0 and arrive at time 1
    rng = jax.random.fold_in(jax.random.key(3), r)
    async_state, metrics = sim.server_step(async_state, rng, data)
    assert metrics['staleness'] == [tau] and metrics['virtual_time'] == 1.0
    # With one client and server sgd(1), a sync round from x0 gives x_client = x0 + delta.
    client_model = run_round(state, jnp.asarray(metrics['clients'], jnp.int32), rng, data)[
      0
    ].server.params
    a = 0.5 * (tau + 1.0) ** -0.5
    expected = jax.tree.map(lambda x, c: (1 - a) * x + a * c, expected, client_model)
  assert_trees_close(sim.algorithm_state(async_state).server.params, expected)


@pytest.mark.parametrize('algorithm', ['apfl', 'fedgen'])
def test_fedasync_generator_is_taught_by_the_mixed_global_model(synthetic_federation, algorithm):
  """The global teacher of a FedAsync step is (1 - a) x + a x_client, the model the server
  holds after it, not x_client (AP-FL: the only teacher; FedGen: for memorized labels the
  client does not hold); FedGen's client teacher is x_client."""
  _, partition, data = synthetic_federation
  if algorithm == 'apfl':
    alg = make_apfl(data, partition, global_teacher_weight=1.0)
  else:
    alg = make_fedgen(data, partition)
  state = alg.init(jax.random.key(0))
  # The server remembers every label, so that the global model teaches FedGen too.
  state = state.replace(server=state.server.replace(seen_counts=jnp.ones(4)))
  config = async_config(server='fedasync', concurrency=1, server_mixing=0.5)
  sim = simulator.AsyncSimulator(alg, config, 4, np.ones(4))
  rng = jax.random.key(3)
  async_state, metrics = sim.server_step(sim.init(state), rng, data)
  (client,) = metrics['clients']
  # One client with server sgd(1): the sync round's global model is x_client.
  x_client = jax.jit(alg.run_round)(state, jnp.asarray([client], jnp.int32), rng, data)[
    0
  ].server.params
  mixture = jax.tree.map(lambda x, c: 0.5 * x + 0.5 * c, state.server.params, x_client)
  result = sim.algorithm_state(async_state).server
  assert_trees_close(result.params, mixture)
  counts = jnp.asarray(partition.train_counts[client], jnp.float32)[None]
  teachers = None if algorithm == 'apfl' else jax.tree.map(lambda c: c[None], x_client)
  expected, _ = jax.jit(knowledge_transfer.train_on_teachers, static_argnums=(0, 1))(
    alg.setup,
    alg.model,
    state.server.generator,
    teachers,
    counts,
    mixture,
    result.seen_counts,
    jax.random.split(rng)[1],
  )
  # Dense_0's bias feeds a batch-statistics BatchNorm: its gradient is rounding noise,
  # which Adam scales up to full steps.
  drop_bias = lambda p: {**p, 'Dense_0': {'kernel': p['Dense_0']['kernel']}}
  assert_trees_close(drop_bias(result.generator.params), drop_bias(expected.params), 1e-4, 1e-5)


def run_until(sim, async_state, data, time, max_steps=200):
  """Server steps (keys fold_in(key(0), step)) until the clock passes `time`."""
  history = []
  for step in range(1, max_steps + 1):
    async_state, metrics = sim.server_step(
      async_state, jax.random.fold_in(jax.random.key(0), step), data
    )
    history.append(metrics)
    if metrics['virtual_time'] > time:
      break
  return async_state, history


@pytest.mark.parametrize('dropout_time,dropout_round', [(6.0, 0), (-1.0, 5)])
def test_dropped_client_never_contributes_after_its_dropout(
  synthetic_federation, dropout_time, dropout_round
):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  config = async_config(
    buffer_size=2,
    availability='bernoulli',
    availability_p=0.8,
    dropout_time=dropout_time,
    dropout_round=dropout_round,
    rejoin_time=20.0,
  )
  sim = simulator.AsyncSimulator(alg, config, 4, np.ones(4), dropout_clients=(0,))
  _, history = run_until(sim, sim.init(alg.init(jax.random.key(0))), data, 25.0)
  arrivals = [
    (t, m['server_version'] - 1 - tau)
    for m in history
    for c, t, tau in zip(m['clients'], m['arrival_times'], m['staleness'])
    if c == 0
  ]
  gone_at = (
    dropout_time
    if dropout_time >= 0
    else next(m['virtual_time'] for m in history if m['server_version'] == dropout_round)
  )
  assert any(t <= gone_at for t, _ in arrivals) and any(t > 20.0 for t, _ in arrivals)
  for t, start_version in arrivals:
    if dropout_time >= 0:
      assert t <= dropout_time or t > 20.0
    else:
      assert start_version < dropout_round or t > 20.0


def test_same_seed_same_events_and_params_also_after_resume(synthetic_federation):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  state = alg.init(jax.random.key(0))
  config = async_config(
    speed_distribution='lognormal',
    speed_spread=1.0,
    buffer_size=2,
    concurrency=3,
    availability='markov',
    availability_p=0.7,
    availability_switch_p=0.2,
  )
  steps = clock.client_step_counts(alg.schedule, data.train_count)
  runs = []
  for resume in (False, True):
    sim = simulator.AsyncSimulator(alg, config, 4, steps)
    async_state, history = sim.init(state), []
    for step in range(1, 5):
      if resume and step == 3:  # the clock goes through JSON, as in a resumed run
        async_state = simulator.AsyncState(
          device=async_state.device, clock=clock.Clock.from_json(async_state.clock.to_json())
        )
      async_state, metrics = sim.server_step(
        async_state, jax.random.fold_in(jax.random.key(1), step), data
      )
      history.append([metrics[k] for k in ('clients', 'arrival_times', 'staleness')])
    runs.append((history, sim.algorithm_state(async_state).server.params))
  assert runs[0][0] == runs[1][0]
  jax.tree.map(np.testing.assert_array_equal, runs[0][1], runs[1][1])


def test_different_speeds_give_staleness_and_fastest_client_most(synthetic_federation, tmp_path):
  _, _, data = synthetic_federation
  alg = make_fedavg(data)
  path = write_trace(tmp_path, 'client,duration\n0,0.5\n1,1\n2,2\n3,8\n')
  config = async_config(
    speed_distribution='trace', speed_trace=path, buffer_size=2, max_staleness=3
  )
  sim = simulator.AsyncSimulator(alg, config, 4, np.ones(4))
  async_state, history = run_until(sim, sim.init(alg.init(jax.random.key(0))), data, 9.0)
  staleness = [tau for m in history for tau in m['staleness']]
  counts = collections.Counter(c for m in history for c in m['clients'])
  assert max(staleness) > 0 and counts.most_common(1)[0][0] == 0
  # Client 3 arrives at time 8, > max_staleness versions late: dropped and counted.
  assert counts[3] == 0 and sum(m['dropped_stale'] for m in history) >= 1
  assert async_state.clock.dropped_stale == sum(m['dropped_stale'] for m in history)
  assert all(np.all(m['finite']) for m in history)
  assert sim.device_step._cache_size() == 1
