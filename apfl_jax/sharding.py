"""Scale-out: a round's cohort split over the devices of a mesh.

A round trains its cohort in one vmapped call (`Algorithm.run_round`). Sharding the
cohort axis over a one-axis mesh ('clients') lets N devices train N times the clients
per call: `shard_cohort_round` jits `run_round` with the cohort ids split over the
devices and everything else (server state, per-client state, the data) replicated.
XLA's SPMD partitioner then propagates the split from the ids to every per-client
array (keys, index rows, the vmapped local training), so each device trains only its
own clients; the server update's weighted mean over clients becomes a cross-device
reduction. Results equal the single-device round up to float reassociation, since a
client's training depends only on its own id and key.

The mesh axis is `AxisType.Auto` (the partitioner decides the layouts): with Explicit
axes (the default of `jax.make_mesh`), vmapped convolutions under jit failed to trace
here.

Multi-host: call `maybe_initialize_distributed()` first thing in every process; the
mesh from `client_mesh()` then spans every process's devices. Every process must call
the round with the same values (same state, cohort and key, which the seeded runner
gives) and the data must fit on each device, since it is replicated.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from apfl_jax.algorithms.base import Algorithm

CLIENTS_AXIS = 'clients'


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Joins a multi-host JAX job when one is described; a no-op otherwise.

  Must run before any other JAX call of the process. Arguments left None are read
  from the environment variables JAX_COORDINATOR_ADDRESS ('host:port' of process 0,
  reachable from every host), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 on the
  coordinator). For example, on two hosts:

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python ...
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python ...

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: number of processes in the job.
    process_id: this process's index in [0, num_processes).

  Returns:
    True when `jax.distributed.initialize` was called, False for a single process
    (no coordinator address given).
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    return False
  if num_processes is None:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
  return True


def client_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh named 'clients' over `devices` (default: every device)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (CLIENTS_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def shard_cohort_round(algorithm: Algorithm, mesh: jax.sharding.Mesh) -> Callable:
  """`algorithm.run_round`, jitted with the cohort split over the mesh's devices.

  Args:
    algorithm: any algorithm; its `run_round` is used as it is.
    mesh: a mesh with a 'clients' axis (see `client_mesh`).

  Returns:
    round_fn(state, cohort, rng, data) -> (state, metrics), the signature of
    `run_round`. The cohort's size must be a multiple of the number of devices on
    the 'clients' axis (ValueError otherwise): padding it with extra clients would
    change the server's average. The returned state is replicated; the metrics'
    leading (cohort) axis stays split over the devices. Its `jitted` attribute is
    the underlying jitted function (to lower, compile or inspect it). Arguments are
    put on their shardings at every call, a no-op for those already there: place the
    data once with `jax.device_put(data, NamedSharding(mesh, P()))` rather than
    copying it to every device each round.
  """
  num_shards = mesh.shape[CLIENTS_AXIS]
  replicated = NamedSharding(mesh, P())
  by_client = NamedSharding(mesh, P(CLIENTS_AXIS))
  jitted = jax.jit(algorithm.run_round,
                   in_shardings=(replicated, by_client, replicated, replicated),
                   out_shardings=(replicated, by_client))

  def round_fn(state: Any, cohort: jax.Array, rng: jax.Array, data: Any):
    if cohort.shape[0] % num_shards:
      raise ValueError(
          f'the cohort has {cohort.shape[0]} clients, not a multiple of the '
          f'{num_shards} devices of the {CLIENTS_AXIS!r} mesh axis; choose the number '
          'of clients per round (num_clients * join_ratio) as such a multiple')
    return jitted(jax.device_put(state, replicated), jax.device_put(cohort, by_client),
                  jax.device_put(rng, replicated), jax.device_put(data, replicated))

  round_fn.jitted = jitted
  return round_fn
