"""Tests of apfl_jax.algorithms.fedavg_ft."""

import dataclasses

from conftest import (
  TinyModel,
  assert_trees_close,
  fedavg_reference_round,
  run_two_rounds_compiling_once,
)
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import registry
from apfl_jax.algorithms.fedavg_ft import FedAvgFT
from apfl_jax.config import config as config_lib
from apfl_jax.core import local_training


def make_fedavg_ft(dataset, partition, finetune_epochs, server_optimizer='sgd', dropout=''):
  config = dataclasses.replace(
    config_lib.Config(),
    batch_size=8,
    num_clients=4,
    finetune_epochs=finetune_epochs,
    seed=3,
    dropout_clients=dropout,
  )
  counts = np.asarray(partition.train_counts).sum(1)
  schedule = local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))
  server = optax.sgd(1.0) if server_optimizer == 'sgd' else optax.adam(1e-2)
  context = registry.BuildContext(TinyModel(), dataset, partition, schedule, optax.sgd(0.1), server)
  return FedAvgFT.from_config(config, context)


def test_global_is_fedavg_and_each_client_fine_tunes_it(synthetic_federation):
  dataset, partition, data = synthetic_federation
  alg = make_fedavg_ft(dataset, partition, 1)
  state = alg.init(jax.random.key(0))
  cohort = jnp.array([0, 2, 3], jnp.int32)
  new_state, _ = jax.jit(alg.run_round)(state, cohort, jax.random.key(5), data)
  fedavg_state, _ = fedavg_reference_round(alg.schedule, data, cohort)
  assert_trees_close(alg.global_params(new_state), fedavg_state.server.params, rtol=1e-6, atol=1e-7)
  assert int(new_state.server.round) == 1
  personalized = jax.jit(alg.personalized_params)
  personal = personalized(new_state, data)
  assert alg.personalized_axis == 0
  kernels = np.asarray(personal['head']['kernel'])
  assert kernels.shape[0] == 4
  for c in range(4):
    assert not np.allclose(kernels[c], new_state.server.params['head']['kernel'])
    assert not np.allclose(kernels[c], kernels[(c + 1) % 4])
  # Client 2's model is the global one trained on its data with its fine-tuning key.
  alone, _ = jax.jit(local_training.train_client, static_argnums=(1, 2, 7))(
    new_state.server.params,
    alg.loss_fn,
    alg.client_optimizer,
    data,
    data.train_index[2],
    data.train_count[2],
    jax.random.fold_in(alg.finetune_key(new_state.server), 2),
    alg.finetune_schedule,
  )
  assert_trees_close(jax.tree.map(lambda x: x[2], personal), alone, rtol=1e-5, atol=1e-6)
  # Deterministic given the state.
  assert_trees_close(personalized(new_state, data), personal, rtol=0, atol=0)


def test_dropout_clients_hold_the_global_model(synthetic_federation):
  dataset, partition, data = synthetic_federation
  everyone = make_fedavg_ft(dataset, partition, 1)
  alg = make_fedavg_ft(dataset, partition, 1, dropout='1,3')
  state = alg.init(jax.random.key(0))
  state, _ = jax.jit(alg.run_round)(state, jnp.array([0, 2], jnp.int32), jax.random.key(5), data)
  personal = jax.jit(alg.personalized_params)(state, data)
  tuned = jax.jit(everyone.personalized_params)(state, data)
  for c in (1, 3):
    assert_trees_close(jax.tree.map(lambda x: x[c], personal), state.server.params, rtol=0, atol=0)
  for c in (0, 2):
    assert_trees_close(
      jax.tree.map(lambda x: x[c], personal), jax.tree.map(lambda x: x[c], tuned), rtol=0, atol=0
    )
    assert not np.allclose(personal['head']['kernel'][c], state.server.params['head']['kernel'])


def test_finetune_epochs_set_the_steps(synthetic_federation):
  dataset, partition, data = synthetic_federation
  batches = int(np.ceil(np.asarray(partition.train_counts).sum(1).max() / 8))
  for epochs in (1, 3):
    alg = make_fedavg_ft(dataset, partition, epochs)
    assert alg.finetune_schedule.local_epochs == epochs
    assert alg.finetune_schedule.num_steps == epochs * batches
  alg = make_fedavg_ft(dataset, partition, 0)
  state = alg.init(jax.random.key(0))
  assert alg.finetune_schedule is None and alg.personalized_axis is None
  assert alg.personalized_params(state, data) is alg.global_params(state)


def test_second_round_does_not_recompile(synthetic_federation):
  dataset, partition, data = synthetic_federation
  alg = make_fedavg_ft(dataset, partition, 1, server_optimizer='adam')
  state, _ = run_two_rounds_compiling_once(alg, data)
  assert int(state.server.round) == 2
