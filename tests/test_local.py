"""Tests of apfl_jax.algorithms.local."""

from conftest import TinyModel
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.local import LocalOnly
from apfl_jax.core import local_training


def test_only_the_cohort_trains_and_nothing_is_shared(synthetic_federation):
  _, _, data = synthetic_federation
  counts = np.asarray(data.train_count)
  schedule = local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))
  alg = LocalOnly(TinyModel(), (6, 6, 1), schedule, optax.sgd(0.1), num_clients=4)
  state = alg.init(jax.random.key(0))
  new_state, _ = jax.jit(alg.run_round)(
    state, jnp.array([1, 2], jnp.int32), jax.random.key(1), data
  )
  before, after = state.clients.params, new_state.clients.params
  changed = [
    not np.allclose(before['head']['kernel'][c], after['head']['kernel'][c]) for c in range(4)
  ]
  assert changed == [False, True, True, False]
  # Client 1 trained exactly as it would alone.
  alone, _ = local_training.train_client(
    jax.tree.map(lambda x: x[1], before),
    alg.loss_fn,
    alg.client_optimizer,
    data,
    data.train_index[1],
    data.train_count[1],
    jax.random.fold_in(jax.random.split(jax.random.key(1))[0], 1),
    schedule,
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-6), after, alone)
  assert alg.global_params(new_state) is None
  assert alg.personalized_axis == 0
  assert alg.personalized_params(new_state, data) is new_state.clients.params
