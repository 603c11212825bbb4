"""Scale-out: the device mesh the client map splits cohorts over, and multi-host init.

`ClientMap(mesh=client_mesh(devices))` (`apfl_jax.core.cohort`; the runner's --num_devices)
constrains every per-client array of a cohort to be split over a one-axis mesh
('clients') while the server state and the data stay replicated (`replicate`); XLA's
SPMD partitioner then runs each device's share of the clients on that device, and the
server update's weighted mean over clients becomes a cross-device reduction. Results
equal the single-device round up to float reassociation, since a client's training
depends only on its own id and key.

The mesh axis is `AxisType.Auto` (the partitioner decides the layouts): with Explicit
axes (the default of `jax.make_mesh`), vmapped convolutions under jit failed to trace
here.

Multi-host (--distributed; not tested here, which has one host): call
`maybe_initialize_distributed()` first thing in every process; the mesh from
`client_mesh()` then spans every process's devices. Every process must call the round
with the same values (same state, cohort and key, which the seeded runner gives) and
the data must fit on each device, since it is replicated.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from apfl_jax.core.cohort import CLIENTS_AXIS


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto_detect: bool = False,
) -> bool:
  """Joins a multi-host JAX job when one is described; a no-op otherwise.

  Must run before any other JAX call of the process. Arguments left None are read
  from the environment variables JAX_COORDINATOR_ADDRESS ('host:port' of process 0,
  reachable from every host), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 on the
  coordinator). Without an address and with `auto_detect` (the runner's
  --distributed), `jax.distributed.initialize()` finds the job itself, as it does on
  Cloud TPU pod slices and under SLURM. For example, on two GPU hosts:

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python ...
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python ...

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: number of processes in the job.
    process_id: this process's index in [0, num_processes).
    auto_detect: without an address, let JAX detect the job (TPU pods, SLURM).

  Returns:
    True when `jax.distributed.initialize` was called, False for a single process
    (no coordinator address given, no auto-detection asked for).
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    if auto_detect:
      jax.distributed.initialize()
    return auto_detect
  if num_processes is None:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(
    coordinator_address=address, num_processes=num_processes, process_id=process_id
  )
  return True


def client_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh named 'clients' over `devices` (default: every device)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
    (len(devices),), (CLIENTS_AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicate(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """`tree` put on every device of `mesh` (unchanged without a mesh)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P()))
