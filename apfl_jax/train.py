"""`train_and_evaluate(config, workdir)`: one complete, resumable federated experiment.

Data flow of a run:
  load the data set (tfds array_record) -> partition it among clients (seeded) ->
  stack every client's index row on the device -> init the algorithm state ->
  per round: pick the cohort (seeded by (seed, round)) -> ONE jitted call trains the
  cohort (through the client map: vmapped, chunked, split over a device mesh) and
  updates the server -> NaN check -> every --eval_every rounds a
  vmapped evaluation of every client -> metrics.jsonl -> every --checkpoint_every
  rounds an orbax checkpoint.

Every random draw of round r is derived from (seed, r), so a run resumed from a
checkpoint computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gc
import io
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, TextIO

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from apfl_jax import (
  algorithms,
  asynchrony,
  callbacks,
  evaluation,
  local_training,
  models,
  preflight,
  run_folder,
  sharding,
)
from apfl_jax import cohort as cohort_lib
from apfl_jax.config import RESUMABLE_FIELDS, Config
from apfl_jax.data import client_data, datasets
from apfl_jax.data import partition as partition_lib
from apfl_jax.errors import ConfigError, RunInterrupted

EVAL_CHUNK = 256
# The workdir's lock file (see `lock_workdir`).
LOCK_NAME = 'run.lock'


def default_workdir(config: Config) -> str:
  """runs/<dataset>_<algorithm>_<time> under the current directory."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{config.dataset}_{config.algorithm}_{stamp}')


def open_workdir(workdir: str, config: Config) -> str:
  """Creates (or reopens) the workdir and checks that it belongs to this config.

  Nothing is written in it: `commit_workdir` writes config.json once the run has started.

  Returns:
    The absolute workdir path.

  Raises:
    ConfigError: naming --workdir if it cannot be written or holds another run.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir: cannot write to {workdir}: {e.strerror or e}') from None
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      previous = json.load(f)
    missing = [key for key in dataclasses.asdict(config) if key not in previous]
    if missing:
      logging.warning(
        "%s was written by a version without %s: its run is used as if it had this run's "
        'values; move it aside if those flags change what the run computes',
        config_path,
        ', '.join(f'--{key}' for key in missing),
      )
    for key, value in dataclasses.asdict(config).items():
      if key in RESUMABLE_FIELDS or key not in previous:
        continue
      if previous[key] != value:
        raise ConfigError(
          f'--workdir {workdir} holds a run with --{key}={previous[key]}, this one has '
          f'--{key}={value}: pass a new --workdir or the same flags'
        )
  return workdir


def commit_workdir(workdir: str, config: Config) -> None:
  """Writes config.json: from now on the workdir belongs to this config."""
  _write_file(os.path.join(workdir, 'config.json'), config.replace(workdir=workdir).to_json())


def lock_workdir(workdir: str) -> TextIO:
  """Takes the workdir's lock file; keep the returned file open for the whole run.

  The lock is an `flock` on `workdir/LOCK_NAME`: the kernel releases it when its holder
  exits, however it exits, so a lock left by a dead process (kill -9) is simply taken.

  Raises:
    ConfigError: naming --workdir when a live process holds the lock.
  """
  lock = open(os.path.join(workdir, LOCK_NAME), 'a+')
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or 'another process'
    lock.close()
    raise ConfigError(
      f'--workdir {workdir} is in use by a running run ({holder}): wait '
      'for it to end or pass another --workdir'
    ) from None
  lock.seek(0)
  lock.truncate()
  lock.write(f'pid {os.getpid()}\n')
  lock.flush()
  return lock


def _first_missing_folder(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
  missing = None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


def _has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _remove_failed_start(workdir: str, created: str | None, entries_before: set[str]) -> None:
  """Removes what a run that never checkpointed made.

  Args:
    workdir: the run's folder.
    created: the outermost folder the run created for it (None: the workdir existed, and
      only the entries the run added to it go).
    entries_before: the workdir's entries before the run.
  """
  if created is None:
    for name in set(os.listdir(workdir)) - entries_before:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    return
  shutil.rmtree(workdir, ignore_errors=True)
  parent = os.path.dirname(workdir)
  while len(parent) >= len(created) and os.path.isdir(parent) and not os.listdir(parent):
    os.rmdir(parent)
    parent = os.path.dirname(parent)


def cohort_for_round(
  seed: int, round_index: int, num_clients: int, join_ratio: float, dropped: tuple[int, ...] = ()
) -> np.ndarray:
  """The sorted client ids that train in `round_index` (deterministic in seed, round).

  Args:
    seed: the experiment seed.
    round_index: the round (from 1).
    num_clients: clients in the federation.
    join_ratio: fraction of the available clients that train.
    dropped: clients that are gone for this round.

  Returns:
    int32 client ids.
  """
  available = np.setdiff1d(np.arange(num_clients), np.asarray(dropped, np.int64))
  size = max(1, int(round(join_ratio * len(available))))
  if size == len(available):
    return available.astype(np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(available, size, replace=False)).astype(np.int32)


@dataclasses.dataclass
class Experiment:
  """Everything built once before the rounds start."""

  config: Config
  dataset: datasets.Dataset
  partition: partition_lib.Partition
  data: client_data.FederatedData
  model: Any
  algorithm: algorithms.Algorithm
  schedule: local_training.Schedule
  groups: dict[str, np.ndarray]
  dropout_clients: tuple[int, ...]
  unseen_classes: np.ndarray


def build_experiment(config: Config) -> Experiment:
  """Loads data, partitions it and builds the model and the algorithm."""
  dataset = datasets.load_dataset(config.dataset, config.data_dir or None)
  if config.test_split == 'pooled':
    dataset = datasets.pooled(dataset)
  preflight.check_data(config, dataset.train_labels, dataset.num_classes, config.dataset)
  partition = partition_lib.partition_dataset(
    dataset.train_labels,
    dataset.test_labels,
    num_clients=config.num_clients,
    scheme=config.partition,
    seed=config.seed,
    num_classes=dataset.num_classes,
    dirichlet_alpha=config.dirichlet_alpha,
    min_samples=config.min_samples_per_client,
    classes_per_client=config.classes_per_client,
    monopoly_clients=config.monopoly_clients,
    monopoly_classes_per_client=config.monopoly_classes_per_client,
    test_split=config.test_split,
    client_train_fraction=config.client_train_fraction,
  )
  client_map = cohort_lib.ClientMap(
    chunk_size=config.client_chunk_size, mesh=_client_mesh(config.num_devices)
  )
  data = sharding.replicate(
    client_data.build_federated_data(dataset, partition, test_multiple=EVAL_CHUNK), client_map.mesh
  )
  counts = np.asarray([len(i) for i in partition.train_indices])
  schedule = local_training.Schedule.create(
    config.batch_size,
    config.local_epochs,
    config.local_steps,
    int(counts.min()),
    int(counts.max()),
    client_counts=tuple(counts.tolist()),
    max_buckets=config.max_client_buckets,
    unroll=config.scan_unroll,
  )
  model = models.create_model(
    config.model, dataset.num_classes, config.conv_impl, config.compute_dtype
  )
  preflight.check_round(config, counts, model, dataset.image_shape)
  algorithm = algorithms.create_algorithm(
    config, model, dataset, partition, schedule
  ).with_client_map(client_map)
  dropout = config.dropout_client_ids(partition.monopoly_clients)
  everyone = np.arange(config.num_clients)
  groups, unseen = {}, np.zeros((0,), np.int64)
  if dropout:
    active = np.setdiff1d(everyone, dropout)
    groups = {'active': active, 'dropout': np.asarray(dropout)}
    unseen = np.setdiff1d(
      partition.classes_held_by(dropout), partition.classes_held_by(active.tolist())
    )
  elif partition.monopoly_clients:
    monopoly = np.asarray(partition.monopoly_clients)
    groups = {'monopoly': monopoly, 'non_monopoly': np.setdiff1d(everyone, monopoly)}
  return Experiment(
    config, dataset, partition, data, model, algorithm, schedule, groups, dropout, unseen
  )


def _client_mesh(num_devices: int) -> jax.sharding.Mesh | None:
  """The 'clients' mesh over the first `num_devices` devices (0: all; 1: no mesh).

  Raises:
    ConfigError: naming --num_devices when there are fewer devices.
  """
  devices = jax.devices()
  if num_devices > len(devices):
    raise ConfigError(
      f'--num_devices={num_devices} but JAX sees {len(devices)} {jax.default_backend()} device(s)'
    )
  if num_devices == 1 or len(devices) == 1:
    return None
  return sharding.client_mesh(devices[: num_devices or len(devices)])


@dataclasses.dataclass(frozen=True)
class EvalInputs:
  """What every evaluation's device function sees inside the one jitted evaluation call.

  Attributes:
    experiment: the run (static: algorithm, model).
    data: the clients' device data.
    unseen_index: int [U'] test-pool rows of the classes no training client held, padded
      to a multiple of EVAL_CHUNK.
    unseen_group: int [U'] 0 on those rows, 1 on the padding.
    num_unseen: how many of those rows are real (static).
    dropout_ids: int [D] the dropout clients.
  """

  experiment: Experiment
  data: Any
  unseen_index: jax.Array
  unseen_group: jax.Array
  num_unseen: int
  dropout_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One named evaluation: counts on the device, metrics on the host.

  Attributes:
    counts: (inputs, algorithm state, the counts of the evaluations before it) -> correct
      counts, traced inside the one jitted evaluation call; None where the evaluation
      does not apply (no global model, ...).
    metrics: (inputs, counts or None, the metrics of the evaluations before it) -> the
      metrics it adds to metrics.jsonl, on the host.
  """

  counts: Callable[[EvalInputs, Any, dict[str, Any]], Any]
  metrics: Callable[[EvalInputs, Any, dict[str, Any]], dict[str, Any]]


def _pool_counts(inputs: EvalInputs, params: Any) -> jax.Array:
  """Correct counts per client of one model on the union test pool."""
  data = inputs.data
  return evaluation.correct_by_group(
    inputs.experiment.model,
    params,
    data,
    data.union_test_index,
    data.union_test_client,
    data.num_clients,
    EVAL_CHUNK,
  )


def _personalized_counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array:
  del before
  algorithm = inputs.experiment.algorithm
  params = algorithm.personalized_params(state, inputs.data)
  if algorithm.personalized_axis is None:
    return _pool_counts(inputs, params)
  return evaluation.client_correct_counts(
    inputs.experiment.model, params, inputs.data, EVAL_CHUNK, client_map=algorithm.client_map
  )


def _personalized_metrics(
  inputs: EvalInputs, correct: Any, before: dict[str, Any]
) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  count = np.asarray(exp.data.test_count)
  return {
    **evaluation.accuracy_summary(correct, count, exp.groups, 'personalized'),
    'client_personalized_acc': [
      round(float(c / n), 6) if n else None for c, n in zip(correct, count)
    ],
  }


def _global_counts(inputs: EvalInputs, state: Any, before: dict[str, Any]) -> jax.Array | None:
  algorithm = inputs.experiment.algorithm
  global_params = algorithm.global_params(state)
  if global_params is None:
    return None
  # A shared personalized model that is the global one (FedAvg): its counts, not a rerun.
  if algorithm.personalized_axis is None and global_params is algorithm.personalized_params(
    state, inputs.data
  ):
    return before['personalized']
  return _pool_counts(inputs, global_params)


def _global_metrics(inputs: EvalInputs, correct: Any, before: dict[str, Any]) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  count = np.asarray(exp.data.test_count)
  return {'global_acc': None if correct is None else float(correct.sum() / max(count.sum(), 1))}


def _no_label_prior_counts(
  inputs: EvalInputs, state: Any, before: dict[str, Any]
) -> jax.Array | None:
  del before
  if not inputs.dropout_ids.shape[0]:
    return None
  algorithm = inputs.experiment.algorithm
  prior_free = algorithm.label_prior_free_params(state, inputs.data, inputs.dropout_ids)
  if prior_free is None:
    return None
  return evaluation.client_correct_counts(
    inputs.experiment.model, prior_free, inputs.data, EVAL_CHUNK, client_ids=inputs.dropout_ids
  )


def _no_label_prior_metrics(
  inputs: EvalInputs, correct: Any, before: dict[str, Any]
) -> dict[str, Any]:
  exp = inputs.experiment
  if not exp.dropout_clients:
    return {}
  # Without knowledge of the dropout clients' own label sets: equal to
  # dropout_personalized_acc for algorithms whose personalization never uses it.
  if correct is None:
    accuracy = before['dropout_personalized_acc']
  else:
    count = np.asarray(exp.data.test_count)[np.asarray(exp.dropout_clients)]
    accuracy = evaluation.accuracy_summary(correct, count, {}, 'x')['x_acc']
  return {'dropout_personalized_acc_no_label_prior': accuracy}


def _unseen_class_counts(
  inputs: EvalInputs, state: Any, before: dict[str, Any]
) -> jax.Array | None:
  del before
  unseen_params = inputs.experiment.algorithm.unseen_class_params(state, inputs.data)
  if unseen_params is None or not inputs.num_unseen:
    return None
  return evaluation.correct_by_group(
    inputs.experiment.model,
    unseen_params,
    inputs.data,
    inputs.unseen_index,
    inputs.unseen_group,
    1,
    EVAL_CHUNK,
  )


def _unseen_class_metrics(
  inputs: EvalInputs, correct: Any, before: dict[str, Any]
) -> dict[str, Any]:
  del before
  exp = inputs.experiment
  if not len(exp.unseen_classes):
    return {}
  return {'unseen_class_acc': None if correct is None else float(correct[0] / inputs.num_unseen)}


# The evaluations of every run, in the order of their metrics in metrics.jsonl. An added
# entry runs inside the same jitted call and writes its metrics beside the others.
EVALUATIONS: dict[str, Evaluation] = {
  'personalized': Evaluation(_personalized_counts, _personalized_metrics),
  'global': Evaluation(_global_counts, _global_metrics),
  'dropout_no_label_prior': Evaluation(_no_label_prior_counts, _no_label_prior_metrics),
  'unseen_class': Evaluation(_unseen_class_counts, _unseen_class_metrics),
}


class Evaluator:
  """ONE jitted call runs every evaluation of `EVALUATIONS` on the algorithm's state."""

  def __init__(self, experiment: Experiment):
    self._exp = experiment
    unseen = np.flatnonzero(
      np.isin(
        experiment.dataset.test_labels[np.asarray(experiment.data.union_test_index)],
        experiment.unseen_classes,
      )
    )
    unseen = unseen[unseen < int(np.asarray(experiment.data.test_count).sum())]
    padded = -(-max(len(unseen), 1) // EVAL_CHUNK) * EVAL_CHUNK
    index = np.zeros((padded,), np.int32)
    index[: len(unseen)] = np.asarray(experiment.data.union_test_index)[unseen]
    group = np.ones((padded,), np.int32)
    group[: len(unseen)] = 0
    self._inputs = EvalInputs(
      experiment,
      experiment.data,
      jnp.asarray(index),
      jnp.asarray(group),
      len(unseen),
      jnp.asarray(experiment.dropout_clients, jnp.int32),
    )
    self._evaluate = jax.jit(self._all_counts)

  def _all_counts(self, state, data, unseen_index, unseen_group, dropout_ids):
    inputs = dataclasses.replace(
      self._inputs,
      data=data,
      unseen_index=unseen_index,
      unseen_group=unseen_group,
      dropout_ids=dropout_ids,
    )
    counts: dict[str, Any] = {}
    for name, e in EVALUATIONS.items():
      counts[name] = e.counts(inputs, state, counts)
    return counts

  def __call__(self, state) -> dict[str, Any]:
    inputs = self._inputs
    counts = jax.device_get(
      self._evaluate(
        state, inputs.data, inputs.unseen_index, inputs.unseen_group, inputs.dropout_ids
      )
    )
    metrics: dict[str, Any] = {}
    for name, e in EVALUATIONS.items():
      metrics.update(e.metrics(inputs, counts[name], metrics))
    return metrics


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
  (`run_folder.save_args`), and `join` puts them back. These defaults serve a driver
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
    self._job_time = asynchrony.step_durations(
      config, config.num_clients
    ) * asynchrony.client_step_counts(experiment.schedule, np.asarray(experiment.data.train_count))
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
    loss, finite = jax.device_get((metrics.loss, metrics.finite))
    return state, StepReport(
      cohort, np.asarray(loss), np.asarray(finite), {'virtual_time': self.virtual_time(round_index)}
    )


class AsyncRounds(Driver):
  """Asynchronous server steps (--server=fedasync|fedbuff): one 'round' = one server
  version. Its state is the device pytree plus the host clock (the checkpoint's host part)."""

  def __init__(self, experiment: Experiment):
    self._exp = experiment
    self._sim = asynchrony.AsyncSimulator(
      experiment.algorithm,
      experiment.config,
      experiment.config.num_clients,
      asynchrony.client_step_counts(experiment.schedule, np.asarray(experiment.data.train_count)),
      experiment.dropout_clients,
    )

  def init(self, state):
    return self._sim.init(state)

  def split(self, async_state):
    return async_state.device, {'clock': json.loads(async_state.clock.to_json())}

  def join(self, device_tree, host):
    clock = asynchrony.Clock.from_json(json.dumps(host['clock']))
    return asynchrony.AsyncState(device=device_tree, clock=clock)

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


def _write_file(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a temporary file, then a rename).

  Raises:
    ConfigError: naming --workdir and the file when it cannot be written (disk full).
  """
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    raise ConfigError(f'--workdir: cannot write {path}: {e.strerror or e}') from None


def _write_metrics(path: str, rows: list[dict[str, Any]]) -> None:
  _write_file(path, ''.join(json.dumps(r) + '\n' for r in rows))


# The hook `_drop_abandoned_orbax_reads` passes everything else on to.
_PREVIOUS_UNRAISABLEHOOK = [sys.unraisablehook]


def _drop_abandoned_orbax_reads(unraisable: Any) -> None:
  """`sys.unraisablehook` that drops orbax coroutines abandoned by a failed restore.

  Their finalizers can also run after the read's event loop has closed, which Python reports
  as an unraisable RuntimeError('Event loop is closed') without an object: dropped too.
  """
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and 'orbax' in code.co_filename:
    return
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return
  _PREVIOUS_UNRAISABLEHOOK[0](unraisable)


def restore_newest_good(
  manager: ocp.CheckpointManager, rounds: Any, tree: Any, workdir: str
) -> tuple[Any, int]:
  """Restores the newest checkpoint that reads back.

  A checkpoint that fails to restore (a truncated or corrupted file) is moved to
  `workdir/corrupt_checkpoints/` with a one-line warning, and the one before it is tried.

  Args:
    manager: the run's checkpoint manager.
    rounds: the `Driver` (joins the restored device pytree and host part).
    tree: the driver's freshly initialised state (the structure to restore into).
    workdir: the run's folder.

  Returns:
    (state, last round it holds); (tree, 0) when no checkpoint restores.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    failure = None
    # A failed read leaves orbax coroutines behind whose tracebacks Python prints when they
    # are collected: those collected here are printed into a captured stderr, those
    # collected later are dropped by `_drop_abandoned_orbax_reads`; one line replaces them.
    with contextlib.redirect_stderr(io.StringIO()):
      try:
        device_tree, host = run_folder.restore_step(manager, step, rounds.split(tree)[0])
        return rounds.join(device_tree, host), step
      except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types
        failure = type(e).__name__
      gc.collect()
    if sys.unraisablehook is not _drop_abandoned_orbax_reads:
      _PREVIOUS_UNRAISABLEHOOK[0] = sys.unraisablehook
      sys.unraisablehook = _drop_abandoned_orbax_reads
    aside = os.path.join(workdir, 'corrupt_checkpoints', f'{step}-{time.time_ns()}')
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(os.path.join(workdir, 'checkpoints', str(step)), aside)
    manager.reload()
    logging.warning(
      'checkpoint of round %d does not restore (%s); moved it to %s and trying the previous one',
      step,
      failure,
      aside,
    )
  return tree, 0


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Final and best-over-rounds values of every accuracy metric in `rows`."""
  summary: dict[str, Any] = {}
  if not rows:
    return summary
  for key in rows[-1]:
    # Accuracies: *_acc, *_acc_weighted and *_acc_no_label_prior (not the per-client lists).
    if isinstance(rows[-1][key], list) or '_acc' not in key:
      continue
    values = [(r[key], r['round']) for r in rows if r.get(key) is not None and not np.isnan(r[key])]
    summary[f'final_{key}'] = rows[-1][key]
    if values:
      best, best_round = max(values)
      summary[f'best_{key}'] = best
      summary[f'best_{key}_round'] = best_round
  return summary


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment described by `config` in `workdir`.

  The workdir is locked for the run (a second live run in it is refused); config.json is
  written only once the data loaded and the sizes passed `preflight`; a run that fails or
  is interrupted before its first checkpoint removes what it created.

  Args:
    config: a validated config.
    workdir: output folder; a folder holding a checkpoint of the same config resumes.

  Returns:
    The summary (final and best-over-rounds metrics), also written to summary.json.

  Raises:
    UserError: one line naming the flag, file, or round and client.
    RunInterrupted: Ctrl-C or SIGTERM; says the round reached and how to resume.
  """
  config.validate()
  workdir = os.path.abspath(os.path.expanduser(workdir or default_workdir(config)))
  created = _first_missing_folder(workdir)
  entries_before = set() if created else set(os.listdir(workdir))
  workdir = open_workdir(workdir, config)
  lock = lock_workdir(workdir)
  try:
    return _run(config, workdir)
  except BaseException:
    if 'config.json' not in entries_before and not _has_checkpoint(workdir):
      _remove_failed_start(workdir, created, entries_before)
    raise
  finally:
    lock.close()


def _run(config: Config, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` in a locked workdir."""
  log = print if config.verbose else (lambda *a, **k: None)
  log(
    f'loading {config.dataset} and partitioning it among {config.num_clients} clients', flush=True
  )
  exp = build_experiment(config)
  commit_workdir(workdir, config)
  _write_file(os.path.join(workdir, 'partition.txt'), exp.partition.table() + '\n')
  _write_file(os.path.join(workdir, 'partition.json'), exp.partition.to_json())
  log(
    f'{config.dataset}: {exp.partition.num_clients} clients, partition '
    f'{config.partition}\n{exp.partition.table()}'
  )

  base_key = jax.random.key(config.seed)
  state = sharding.replicate(
    exp.algorithm.init(jax.random.fold_in(base_key, 0)), exp.algorithm.client_map.mesh
  )
  rounds: Driver = SyncRounds(exp) if config.server == 'sync' else AsyncRounds(exp)
  tree = rounds.init(state)
  manager = ocp.CheckpointManager(
    os.path.join(workdir, 'checkpoints'), options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )
  try:
    return _round_loop(config, workdir, exp, rounds, tree, manager, base_key, log)
  finally:
    manager.wait_until_finished()  # an async save still in flight is kept
    manager.close()


def _round_loop(
  config: Config,
  workdir: str,
  exp: Experiment,
  rounds: Driver,
  tree: Any,
  manager: ocp.CheckpointManager,
  base_key: jax.Array,
  log: Any,
) -> dict[str, Any]:
  """Resumes from the newest good checkpoint and runs the remaining rounds."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  tree, done = restore_newest_good(manager, rounds, tree, workdir)
  if done:
    log(f'resuming {workdir} after round {done}')
  rows = run_folder.read_metrics(workdir, done)
  _write_metrics(metrics_path, rows)
  elapsed_offset = rows[-1]['elapsed_s'] if rows else 0.0

  evaluate = Evaluator(exp)
  hooks = callbacks.default_callbacks(workdir, rows, manager, rounds, config, log)
  if done < config.num_rounds:
    log(
      f'round {done + 1}/{config.num_rounds}: compiling the round and the evaluation '
      '(the first round takes longer)',
      flush=True,
    )
  t0 = time.perf_counter()
  r = done
  try:
    for r in range(done + 1, config.num_rounds + 1):
      tree, report = rounds.step(tree, r, jax.random.fold_in(base_key, r))
      for hook in hooks:
        hook.after_step(r, report)
      row = None
      if r % config.eval_every == 0 or r == config.num_rounds:
        row = {
          'round': r,
          **evaluate(rounds.algorithm_state(tree)),
          'train_loss': float(np.mean(report.loss)),
          **report.extra,
          'elapsed_s': round(elapsed_offset + time.perf_counter() - t0, 3),
        }
      for hook in hooks:
        hook.after_round(r, tree, row, report)
  except KeyboardInterrupt:
    manager.wait_until_finished()
    saved = manager.latest_step() or 0
    kept = (
      (
        f'rounds 1-{saved} are checkpointed; rerun the same command with '
        f'--workdir={workdir} to resume'
      )
      if saved
      else 'nothing was checkpointed yet; rerun the same command to start over'
    )
    raise RunInterrupted(f'interrupted in round {r + 1}/{config.num_rounds}: {kept}') from None
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    raise ConfigError(
      f'--batch_size: round {r} ran out of device memory; lower --batch_size or --join_ratio'
    ) from None
  finally:
    for hook in hooks:
      hook.close()

  summary = summarize(rows)
  _write_file(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=2))
  log(format_summary(summary, workdir))
  return summary


def format_summary(summary: dict[str, Any], workdir: str) -> str:
  """A small table of final and best accuracies."""
  lines = [f'results in {workdir}', f'{"metric":<34} {"final":>8} {"best":>8} {"round":>6}']
  for key in summary:
    if not key.startswith('final_'):
      continue
    name = key[len('final_') :]
    final = summary[key]
    best = summary.get(f'best_{name}')
    fmt = lambda v: (
      '     n/a' if v is None or (isinstance(v, float) and np.isnan(v)) else f'{v:8.4f}'
    )
    lines.append(f'{name:<34} {fmt(final)} {fmt(best)} {summary.get(f"best_{name}_round", ""):>6}')
  return '\n'.join(lines)
