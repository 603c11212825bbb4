"""The contract every registered algorithm keeps (a new one gets these by registering).

For each name in the registry, built from flags as `--algorithm=NAME` builds it:
- `init` and one round run, and a second round with another cohort does not recompile;
- a state saved to an orbax checkpoint after round 2 and restored continues exactly as
  the uninterrupted state (round 3 bit for bit, personalized models included).
"""

from conftest import TinyModel
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import APFL_TINY

from apfl_jax import algorithms
from apfl_jax.algorithms import registry
from apfl_jax.config.config import Config
from apfl_jax.core import local_training
from apfl_jax.runner import checkpoints

# Small enough for every algorithm's extra work (generators, friends, fine-tuning).
TINY_FLAGS = dict(
  num_clients=4, batch_size=8, local_epochs=1, local_steps=0, learning_rate=0.1, **APFL_TINY
)


def build(name, dataset, partition, data):
  config = Config(**TINY_FLAGS).replace(algorithm=name).validate()
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(
    config.batch_size, config.local_epochs, config.local_steps, int(counts.min()), int(counts.max())
  )
  return algorithms.create_algorithm(config, TinyModel(), dataset, partition, schedule)


@pytest.mark.parametrize('name', registry.names())
def test_round_compiles_once_and_a_restored_state_continues_exactly(
  name, synthetic_federation, tmp_path
):
  dataset, partition, data = synthetic_federation
  algorithm = build(name, dataset, partition, data)
  run_round = jax.jit(algorithm.run_round)
  state = algorithm.init(jax.random.key(0))
  state, metrics = run_round(state, np.array([1, 3], np.int32), jax.random.key(1), data)
  assert np.isfinite(np.asarray(metrics.loss)).all()
  state, _ = run_round(state, np.array([0, 2], np.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1

  with ocp.CheckpointManager(str(tmp_path / 'checkpoints')) as manager:
    manager.save(2, args=checkpoints.save_args(state, {}))
    manager.wait_until_finished()
    template = algorithm.init(jax.random.key(7))
    restored, host = checkpoints.restore_step(manager, 2, template)
  assert host == {}

  cohort, key = np.array([0, 1], np.int32), jax.random.key(3)
  straight, _ = run_round(state, cohort, key, data)
  resumed, _ = run_round(restored, cohort, key, data)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  jax.tree.map(
    np.testing.assert_array_equal,
    algorithm.personalized_params(resumed, data),
    algorithm.personalized_params(straight, data),
  )
