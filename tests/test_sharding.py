"""The sharding helpers; the sharded client map itself is tested in tests/test_cohort.py."""

import jax
import jax.numpy as jnp

from apfl_jax.core import sharding


def test_no_distributed_job_without_coordinator(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  assert not sharding.maybe_initialize_distributed()


def test_replicate_puts_a_tree_on_every_mesh_device():
  tree = {'w': jnp.ones((3,))}
  assert sharding.replicate(tree, None) is tree
  mesh = sharding.client_mesh(jax.devices()[:1])
  placed = sharding.replicate(tree, mesh)
  assert placed['w'].sharding.is_fully_replicated
  assert set(placed['w'].sharding.device_set) == set(mesh.devices.flat)
