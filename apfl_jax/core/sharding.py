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

Multi-process (--distributed; docs/multihost.md): call `maybe_initialize_distributed()`
first thing in every process; the mesh from `client_mesh()` then spans every process's
devices. Every process runs the same rounds with the same values (same state, cohort and
key, which the seeded runner gives) and the data must fit on each device, since it is
replicated. Per-client results split over the processes are read on the host through
`to_host` (every process gets the whole array); only `is_main_process()` writes the
run's files, and `barrier` lets the others wait for it. `fail_fast` ends a failing
process with one line and, through the job's key-value store and a watch thread in
every process, the other processes too (without it they would wait in a collective
until jax's heartbeat timeout, then abort with a C++ stack trace).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from typing import Any, NoReturn

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from apfl_jax.core.cohort import CLIENTS_AXIS, DISTRIBUTED_TIMEOUT_S
from apfl_jax.core.errors import ConfigError


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto_detect: bool = False,
  timeout_s: int = DISTRIBUTED_TIMEOUT_S,
) -> bool:
  """Joins a multi-process JAX job when one is described; a no-op otherwise.

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
    timeout_s: seconds to wait for the coordinator and every process to join; also the
      heartbeat timeout (a process silent that long ends the job) and the shutdown
      barrier's (--distributed_timeout_s).

  Returns:
    True when `jax.distributed.initialize` was called, False for a single process
    (no coordinator address given, no auto-detection asked for).

  Raises:
    ConfigError: one line when no job is described or found (--distributed without a
      coordinator outside TPU pods and SLURM), or the coordinator does not answer, or the
      other processes do not join, within `timeout_s`.
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address and not auto_detect:
    return False
  timeouts: dict[str, Any] = dict(
    initialization_timeout=timeout_s,
    heartbeat_timeout_seconds=timeout_s,
    shutdown_timeout_seconds=timeout_s,
  )
  try:
    if address:
      if num_processes is None:
        num_processes = int(os.environ['JAX_NUM_PROCESSES'])
      if process_id is None:
        process_id = int(os.environ['JAX_PROCESS_ID'])
      if process_id != 0:
        _wait_for_coordinator(address, timeout_s)
      jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        **timeouts,
      )
    else:
      jax.distributed.initialize(**timeouts)
  except KeyError as e:
    raise ConfigError(
      f'--distributed: JAX_COORDINATOR_ADDRESS={address} is set but {e.args[0]} is not'
    ) from None
  except (ValueError, RuntimeError) as e:
    where = f'coordinator {address}' if address else 'no coordinator given or detected'
    raise ConfigError(
      f'--distributed: cannot join the job ({where}: {" ".join(str(e).split())[:200]}); set '
      'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run on a Cloud TPU '
      'pod slice or under SLURM (docs/multihost.md)'
    ) from None
  _watch_for_failures()
  return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until the coordinator's port accepts connections.

  jaxlib ends the process with a C++ stack trace when the coordinator does not answer;
  probing it first turns that into one line.

  Raises:
    ConfigError: nothing answered at `address` within `timeout_s`.
  """
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except (OSError, ValueError) as e:
      if time.monotonic() >= deadline or isinstance(e, ValueError):
        raise ConfigError(
          f'--distributed: the coordinator {address} (JAX_COORDINATOR_ADDRESS, process 0) '
          f'did not answer within --distributed_timeout_s={timeout_s:g} s: start process 0 '
          'first, check the address and that the port is open'
        ) from None
      time.sleep(0.5)


# The coordination service's key under which the first process to fail leaves its line.
_FAILED_KEY = 'apfl_jax/failed'
_stop_watching = threading.Event()
_exiting = threading.Lock()
_barriers: list[str] = []


def _coordination_client() -> Any:
  """jax's client of the job's key-value store (None without a job)."""
  from jax._src import distributed  # noqa: PLC0415 -- no public accessor

  return distributed.global_state.client


def in_job() -> bool:
  """Whether this process joined a multi-process job (`maybe_initialize_distributed`)."""
  return _coordination_client() is not None and jax.process_count() > 1


def _watch_for_failures(interval_s: float = 0.5) -> None:
  """Starts a thread that ends this process when another process of the job failed.

  A process that fails leaves its line in the job's key-value store (`fail_fast`); the
  others may be blocked in a collective that never returns (or returns only after the
  heartbeat timeout, with a C++ stack trace), so this thread ends them with one line.
  """
  client = _coordination_client()
  if client is None or jax.process_count() == 1:
    return
  atexit.register(_stop_watching.set)  # before jax's own shutdown (atexit runs LIFO)

  def watch() -> None:
    while not _stop_watching.wait(interval_s):
      try:
        value = client.key_value_try_get(_FAILED_KEY)
      except Exception:  # noqa: BLE001 -- NOT_FOUND: nobody failed; others: see below
        continue
      index, _, line = value.partition('\t')
      if not _stop_watching.is_set() and int(index) != jax.process_index():
        _exit_line(f'stopped: process {index} failed ({line})')

  threading.Thread(target=watch, name='apfl_jax-failure-watch', daemon=True).start()


def fail_fast(line: str) -> NoReturn:
  """Ends this process with `error: <line>` on stderr and exit status 1.

  Alone, this is `sys.exit`. In a multi-process job the line names this process and the
  process that failed first (another process's failure often surfaces here as a
  collective's error), the failure is left in the job's key-value store for the others'
  watch threads, and the process exits at once: a normal exit would wait at jax's
  shutdown barrier for processes that are waiting for this one.
  """
  if not in_job():
    sys.exit(f'error: {line}')
  _stop_watching.set()
  index = jax.process_index()
  client = _coordination_client()
  try:
    client.key_value_set(_FAILED_KEY, f'{index}\t{line}')
  except Exception:  # noqa: BLE001 -- ALREADY_EXISTS: another process failed first
    try:
      first, _, first_line = client.key_value_try_get(_FAILED_KEY).partition('\t')
      if int(first) != index:
        line = f'stopped: process {first} failed ({first_line}); here: {line}'
    except Exception:  # noqa: BLE001 -- the coordinator (process 0) is gone
      pass
  if index == 0:
    time.sleep(4 * 0.5)  # the others' watch threads read the line from this process
  _exit_line(line)


def _exit_line(line: str) -> NoReturn:
  """Writes this process's one error line and ends it (once, whichever thread calls)."""
  _exiting.acquire()  # never released: a second caller waits here for os._exit
  sys.stdout.flush()
  sys.stderr.write(f'error: process {jax.process_index()} of {jax.process_count()}: {line}\n')
  sys.stderr.flush()
  os._exit(1)


def is_main_process() -> bool:
  """Whether this process writes the run's files (process 0; True without a job)."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 3600) -> None:
  """Waits until every process of the job reaches `barrier(name)` (no-op alone).

  A barrier of the job's coordination service (no device collective), so a long wait
  (process 0 preparing a data set) costs nothing; a process that fails meanwhile ends the
  others through `fail_fast`.
  """
  if in_job():
    _barriers.append(name)  # an id used once: every process passes the same barriers in order
    _coordination_client().wait_at_barrier(f'{name}#{len(_barriers)}', int(timeout_s * 1000))


def to_host(tree: Any) -> Any:
  """`tree`'s arrays as numpy arrays, also those split over other processes' devices.

  Every host read of per-client results goes through here: `jax.device_get` refuses an
  array with shards on devices of other processes, so those are all-gathered
  (`process_allgather`, a collective: every process calls `to_host` on the same arrays
  in the same order, which the runner's identical control flow gives).
  """

  def read(x: Any) -> Any:
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(read, tree)


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
