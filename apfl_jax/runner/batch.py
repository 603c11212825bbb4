"""Many experiments in one jitted program: seeds and hyper-parameters as one more axis.

`train_and_evaluate_batch(configs, workdirs)` runs E synchronous experiments of one
algorithm that differ only in `AXIS_FLAGS` (the seed, and hyper-parameters that change
no shape and no code path) as ONE program: every round is one jitted call of the
algorithm's `run_round` mapped over the experiments (the client map stays inside, with
its chunks), and so is the evaluation. The experiments run side by side (`jax.vmap`: one
wide computation, the accelerator mode) or take turns inside the program (`lax.map`: one
compiled body, a round's memory that of one experiment; the CPU default and the mode
with --client_chunk_size). The images are on the device once; each experiment's index
rows (its own partition), cohorts and keys are stacked on a leading axis, padded to
common widths (padded positions are masked, as within one run).

Each experiment is its own run: its own workdir with config.json, partition files,
metrics.jsonl, TensorBoard, checkpoints and summary.json, equal to a separate
`train_and_evaluate` of its config (the same keys: each client keyed from its own seed),
so any of them can later be resumed or re-read alone. The batch resumes from the round
every experiment has checkpointed. An experiment that diverges is reported by its workdir
and stops writing; the others go on.

How one algorithm object serves every experiment: each experiment's algorithm is built
on the host as for a separate run (with a schedule common to all, whose step bounds hold
for every partition; padded steps are masked, so a client's steps are its own), then the
attributes in which they differ (arrays such as label counts, numbers such as beta or a
seed, number fields of dataclasses such as an optimizer's learning rate,
`local_training.Optimizer`) are stacked and handed to the mapped function, which puts
them into a copy of the first experiment's algorithm. An attribute that differs in any
other way (a static schedule, a closure) cannot be batched: the flag that caused it is
refused in one line (`NotBatchable`), and `studies.compare` then runs one program per
experiment.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from apfl_jax.config import preflight
from apfl_jax.config.config import Config
from apfl_jax.core import local_training
from apfl_jax.core.errors import ConfigError, RunInterrupted, TrainingDivergedError
from apfl_jax.data.client_data import FederatedData
from apfl_jax.runner import callbacks, checkpoints, run_folder
from apfl_jax.runner import workdir as workdir_lib
from apfl_jax.runner.drivers import Driver, StepReport, SyncRounds, cohort_for_round
from apfl_jax.runner.evaluators import EVALUATIONS, EvalInputs
from apfl_jax.runner.experiment import EVAL_CHUNK, Experiment, build_experiment

# Flags the experiments of one program may differ in: the seed (partition, initialisation,
# keys) and hyper-parameters that enter the computation as numbers.
AXIS_FLAGS = (
  'seed',
  'learning_rate',
  'server_learning_rate',
  'apfl_friend_learning_rate',
  'apfl_beta',
  'fedprox_mu',
  'ditto_lambda',
  'apfl_deng_alpha',
  'fedgen_alpha',
  'fedgen_beta',
)

_TRACER_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerBoolConversionError,
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerArrayConversionError,
)


class NotBatchable(ConfigError):
  """The experiments cannot share one program (they can still run one by one)."""


# Fields that are per run by nature.
PER_RUN_FIELDS = ('workdir', 'verbose')

# FederatedData fields that belong to one experiment (its partition); the others (the
# images, labels and pixel statistics) are shared.
_PER_EXPERIMENT_DATA = (
  'train_index',
  'train_count',
  'test_index',
  'test_count',
  'union_test_index',
  'union_test_client',
)
# vmap's in_axes for a stacked FederatedData (axis numbers in the arrays' places).
DATA_AXES: Any = FederatedData(
  **{  # type: ignore[arg-type]
    f.name: (0 if f.name in _PER_EXPERIMENT_DATA else None)
    for f in dataclasses.fields(FederatedData)
  }
)


def check_batchable(configs: Sequence[Config]) -> tuple[str, ...]:
  """The flags the experiments differ in, after checking they may share one program.

  Args:
    configs: validated configs of the experiments.

  Returns:
    The names of the `AXIS_FLAGS` whose values differ.

  Raises:
    ConfigError: naming the first flag that may not differ, or an async server.
  """
  if not configs:
    raise ConfigError('the experiment axis needs at least one experiment')
  first = dataclasses.asdict(configs[0])
  differing = set()
  for config in configs[1:]:
    for name, value in dataclasses.asdict(config).items():
      if name not in PER_RUN_FIELDS and value != first[name]:
        if name not in AXIS_FLAGS:
          raise NotBatchable(
            f'--{name}: experiments of one program must share it ({first[name]!r} vs '
            f'{value!r}); the experiment axis varies only {", ".join(AXIS_FLAGS)}'
          )
        differing.add(name)
  if configs[0].server != 'sync':
    raise NotBatchable(
      f'--server={configs[0].server}: the experiment axis runs sync rounds only; run '
      'asynchronous experiments one at a time'
    )
  if configs[0].num_devices > 1:
    raise NotBatchable(
      f'--num_devices={configs[0].num_devices}: the experiment axis runs on one device'
    )
  return tuple(sorted(differing))


def common_schedule(experiments: Sequence[Experiment]) -> local_training.Schedule:
  """A schedule whose static step bounds hold for every experiment's clients.

  The size groups' bounds come from the clients' example counts sorted largest first;
  their element-wise maximum over the experiments bounds each experiment's groups.
  """
  counts = np.stack([np.sort(np.asarray(e.data.train_count))[::-1] for e in experiments]).max(
    axis=0
  )
  config = experiments[0].config
  everyone = np.concatenate([np.asarray(e.data.train_count) for e in experiments])
  return local_training.Schedule.create(
    config.batch_size,
    config.local_epochs,
    config.local_steps,
    int(everyone.min()),
    int(everyone.max()),
    client_counts=tuple(int(c) for c in counts),
    max_buckets=config.max_client_buckets,
    unroll=config.scan_unroll,
  )


def stack_data(datas: Sequence[FederatedData]) -> FederatedData:
  """The experiments' data with their partitions stacked (padded) and images shared."""
  num_clients = datas[0].num_clients

  def pad(name: str, x: np.ndarray, width: int) -> np.ndarray:
    fill = num_clients if name == 'union_test_client' else 0
    widths = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
    return np.pad(x, widths, constant_values=fill)

  fields = {}
  for f in dataclasses.fields(FederatedData):
    values = [getattr(d, f.name) for d in datas]
    if f.name not in _PER_EXPERIMENT_DATA:
      fields[f.name] = values[0]
      continue
    arrays = [np.asarray(v) for v in values]
    width = max(a.shape[-1] for a in arrays)
    fields[f.name] = jnp.asarray(np.stack([pad(f.name, a, width) for a in arrays]))
  return FederatedData(**fields)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def fingerprint(value: Any, depth: int = 0) -> Any:
  """A comparable summary of what an attribute computes with: for functions and optax
  transformations their code and everything their closures captured, recursively."""
  if depth > 8:
    return ('deep', id(value))
  if isinstance(value, (np.ndarray, jax.Array)):
    array = np.asarray(value)
    return ('array', array.shape, str(array.dtype), array.tobytes())
  if isinstance(value, optax.GradientTransformation):
    return ('optax', fingerprint(value.init, depth + 1), fingerprint(value.update, depth + 1))
  if isinstance(value, functools.partial):
    return (
      'partial',
      fingerprint(value.func, depth + 1),
      fingerprint(value.args, depth + 1),
      fingerprint(value.keywords, depth + 1),
    )
  code = getattr(value, '__code__', None)
  if code is not None:
    cells = []
    for cell in getattr(value, '__closure__', None) or ():
      try:
        cells.append(fingerprint(cell.cell_contents, depth + 1))
      except ValueError:  # an empty cell
        cells.append(('empty',))
    return ('function', code, tuple(cells), fingerprint(value.__defaults__, depth + 1))
  if isinstance(value, (tuple, list)):
    return (type(value).__name__, tuple(fingerprint(v, depth + 1) for v in value))
  if dataclasses.is_dataclass(value) and not isinstance(value, type):  # flax modules too
    return (
      type(value),
      tuple(
        (f.name, fingerprint(getattr(value, f.name), depth + 1)) for f in dataclasses.fields(value)
      ),
    )
  if isinstance(value, dict):
    return ('dict', tuple((k, fingerprint(v, depth + 1)) for k, v in sorted(value.items())))
  return value


def _same(a: Any, b: Any) -> bool:
  try:
    return bool(fingerprint(a) == fingerprint(b))
  except (TypeError, ValueError):  # an object whose == is not a truth value
    return a is b


def split_algorithms(algorithms: Sequence[Any], flags: Sequence[str]) -> dict[str, Any]:
  """The attributes (`name` or `name.field`) in which the algorithms differ, stacked.

  Args:
    algorithms: one algorithm object per experiment, built for a separate run each.
    flags: the flags the experiments differ in (named when batching fails).

  Returns:
    {attribute path: stacked values [E, ...]} to put into a copy of the first algorithm.

  Raises:
    ConfigError: an attribute that differs other than as numbers or arrays of one shape.
  """
  lifted: dict[str, Any] = {}

  def lift(path: str, values: list[Any]) -> None:
    arrays = [np.asarray(v) for v in values]
    if len({a.shape for a in arrays}) > 1:
      refuse(path)
    lifted[path] = jnp.asarray(np.stack(arrays))

  def refuse(path: str) -> None:
    named = ', '.join(f'--{f}' for f in flags) or 'the partition'
    raise NotBatchable(
      f'{named}: the experiments build {type(algorithms[0]).__name__}s that differ in '
      f'{path!r}, which cannot be batched; run them as separate programs'
    )

  for name, first in vars(algorithms[0]).items():
    values = [vars(a)[name] for a in algorithms]
    if isinstance(first, (np.ndarray, jax.Array)):
      if any(not np.array_equal(np.asarray(v), np.asarray(first)) for v in values[1:]):
        lift(name, values)
    elif all(_same(first, v) for v in values[1:]):
      continue
    elif _is_number(first):
      lift(name, values)
    elif isinstance(first, local_training.Schedule):
      refuse(name)  # static: scan lengths and step bounds
    elif dataclasses.is_dataclass(first) and not isinstance(first, type):
      for f in dataclasses.fields(first):
        sub = [getattr(v, f.name) for v in values]
        if all(_same(sub[0], s) for s in sub[1:]):
          continue
        if _is_number(sub[0]) or isinstance(sub[0], (np.ndarray, jax.Array)):
          lift(f'{name}.{f.name}', sub)
        else:
          refuse(f'{name}.{f.name}')
    else:
      refuse(name)
  return lifted


def with_lifted(template: Any, lifted: dict[str, Any]) -> Any:
  """A copy of `template` with the attributes of one experiment (inside the trace)."""
  clone = copy.copy(template)
  nested: dict[str, dict[str, Any]] = {}
  for path, value in lifted.items():
    name, _, field = path.partition('.')
    if field:
      nested.setdefault(name, {})[field] = value
    else:
      setattr(clone, name, value)
  # Attributes that are one object in the template (AP-FL's personal_optimizer is its
  # client_optimizer) stay one object in the copy.
  replaced: dict[int, Any] = {}
  for name, fields in nested.items():
    original = getattr(template, name)
    if id(original) not in replaced:
      replaced[id(original)] = dataclasses.replace(original, **fields)
    setattr(clone, name, replaced[id(original)])
  return clone


class ExperimentBatch:
  """E experiments' rounds and evaluations, each ONE jitted call over the experiments.

  Side by side (`jax.vmap` over the experiments: one wide computation, for accelerators)
  or taking turns (`lax.map`: one compiled body run E times in the program, a round's
  memory that of one experiment). The default is side by side on an accelerator and
  taking turns on CPU, where the wide computation measured slower than the runs one
  after another (docs/benchmarks.md), and always taking turns with --client_chunk_size.
  """

  def __init__(
    self,
    experiments: Sequence[Experiment],
    flags: Sequence[str],
    side_by_side: bool | None = None,
  ):
    schedule = common_schedule(experiments)
    self.experiments = list(experiments)
    self.algorithms = [e.algorithm.with_schedule(schedule) for e in experiments]
    self.template = self.algorithms[0]
    self.flags = tuple(flags)
    self.lifted = split_algorithms(self.algorithms, flags)
    self.data = stack_data([e.data for e in experiments])
    self.unseen_index, self.unseen_group, self.num_unseen = self._unseen_rows()
    self.dropout_ids = self._dropout_ids()
    config = experiments[0].config
    if side_by_side is None:
      side_by_side = jax.default_backend() != 'cpu' and not config.client_chunk_size
    self.side_by_side = side_by_side
    preflight.check_round(
      config,
      np.concatenate([np.asarray(e.data.train_count) for e in experiments]),
      experiments[0].model,
      experiments[0].dataset.image_shape,
      experiments=len(experiments) if side_by_side else 1,
    )
    over_experiments = jax.vmap if side_by_side else _map_over_experiments
    self._run_round = jax.jit(over_experiments(self._one_round, in_axes=(0, 0, 0, 0, DATA_AXES)))
    self._evaluate = jax.jit(
      over_experiments(self._one_evaluation, in_axes=(0, 0, DATA_AXES, 0, 0, 0))
    )

  def _unseen_rows(self) -> tuple[jax.Array, jax.Array, list[int]]:
    """Each experiment's test-pool rows of its unseen classes, padded to one width."""
    rows, counts = [], []
    for e in self.experiments:
      union = np.asarray(e.data.union_test_index)
      real = int(np.asarray(e.data.test_count).sum())
      unseen = np.flatnonzero(np.isin(e.dataset.test_labels[union], e.unseen_classes))
      unseen = unseen[unseen < real]
      rows.append(union[unseen])
      counts.append(len(unseen))
    if len({c > 0 for c in counts}) > 1:
      raise NotBatchable(
        '--seed: some experiments have classes no active client holds and some do not; run '
        'them as separate programs'
      )
    width = -(-max(max(counts), 1) // EVAL_CHUNK) * EVAL_CHUNK
    index = np.zeros((len(rows), width), np.int32)
    group = np.ones((len(rows), width), np.int32)
    for k, r in enumerate(rows):
      index[k, : len(r)] = r
      group[k, : len(r)] = 0
    return jnp.asarray(index), jnp.asarray(group), counts

  def _dropout_ids(self) -> jax.Array:
    ids = [e.dropout_clients for e in self.experiments]
    if len({len(i) for i in ids}) > 1:
      raise NotBatchable(
        '--dropout_clients: the experiments drop out different numbers of clients; run '
        'them as separate programs'
      )
    return jnp.asarray(np.asarray(ids, np.int32).reshape(len(ids), -1))

  def algorithm(self, lifted: dict[str, Any]) -> Any:
    return with_lifted(self.template, lifted)

  def _one_round(self, lifted, state, cohort, rng, data):
    return self.algorithm(lifted).run_round(state, cohort, rng, data)

  def _one_evaluation(self, lifted, state, data, unseen_index, unseen_group, dropout_ids):
    experiment = dataclasses.replace(self.experiments[0], algorithm=self.algorithm(lifted))
    inputs = EvalInputs(
      experiment, data, unseen_index, unseen_group, self.num_unseen[0], dropout_ids
    )
    counts: dict[str, Any] = {}
    for name, e in EVALUATIONS.items():
      counts[name] = e.counts(inputs, state, counts)
    return counts

  def init(self, keys: jax.Array) -> Any:
    """The experiments' initial states, stacked."""
    with self._batching():
      return jax.vmap(lambda lifted, key: self.algorithm(lifted).init(key))(self.lifted, keys)

  def run_round(self, state: Any, cohorts: np.ndarray, rngs: jax.Array) -> tuple[Any, Any]:
    with self._batching():
      return self._run_round(self.lifted, state, cohorts, rngs, self.data)

  @contextlib.contextmanager
  def _batching(self):
    """Turns an attribute that the algorithm needs as a Python value into NotBatchable."""
    try:
      yield
    except _TRACER_ERRORS as e:
      raise NotBatchable(
        f'{", ".join(f"--{f}" for f in self.flags) or "the partition"}: the algorithm needs '
        f'one of {", ".join(sorted(self.lifted))} as a fixed value '
        f'({type(e).__name__}); run the experiments as separate programs'
      ) from None

  def evaluate(self, state: Any) -> list[dict[str, Any]]:
    """Every experiment's evaluation metrics (one call, then the host part of each)."""
    counts = jax.device_get(
      self._evaluate(
        self.lifted, state, self.data, self.unseen_index, self.unseen_group, self.dropout_ids
      )
    )
    out = []
    for k, e in enumerate(self.experiments):
      inputs = EvalInputs(e, e.data, None, None, self.num_unseen[k], None)  # type: ignore[arg-type]
      mine = jax.tree.map(lambda x: x[k], counts)
      metrics: dict[str, Any] = {}
      for name, evaluation in EVALUATIONS.items():
        metrics.update(evaluation.metrics(inputs, mine[name], metrics))
      out.append(metrics)
    return out


def _map_over_experiments(fn: Any, in_axes: tuple[Any, ...]) -> Any:
  """`jax.vmap(fn, in_axes)`'s result computed one experiment at a time (`lax.map`)."""

  def mapped(*args):
    flat_axes, flat_args = [], []
    for a, x in zip(in_axes, args):
      leaves = jax.tree.leaves(x)
      if a is None or isinstance(a, int):
        flat_axes.append([a] * len(leaves))
      else:  # a pytree of axes with x's structure and no empty subtrees (DATA_AXES)
        flat_axes.append(jax.tree.leaves(a, is_leaf=lambda v: v is None))
      assert len(flat_axes[-1]) == len(leaves), (a, len(leaves))
      flat_args.append(leaves)
    stacked = [
      [leaf for leaf, ax in zip(leaves, ax_list) if ax == 0]
      for leaves, ax_list in zip(flat_args, flat_axes)
    ]

    def one(xs):
      rebuilt = []
      for x, leaves, ax_list, mapped_leaves in zip(args, flat_args, flat_axes, xs):
        it = iter(mapped_leaves)
        new = [next(it) if ax == 0 else leaf for leaf, ax in zip(leaves, ax_list)]
        rebuilt.append(jax.tree.unflatten(jax.tree.structure(x), new))
      return fn(*rebuilt)

    return jax.lax.map(one, stacked)

  return mapped


def take(tree: Any, k: int) -> Any:
  """Experiment `k`'s slice of a stacked pytree."""
  return jax.tree.map(lambda x: x[k], tree)


def train_and_evaluate_batch(
  configs: Sequence[Config], workdirs: Sequence[str], side_by_side: bool | None = None
) -> list[dict[str, Any] | Exception]:
  """Runs (or resumes) E sync experiments of one algorithm as one program.

  Args:
    configs: the experiments' configs, differing only in `AXIS_FLAGS`.
    workdirs: one output folder each (a folder holding a checkpoint of the same config
      resumes, as for `train.train_and_evaluate`).
    side_by_side: vmap the experiments (True) or map over them in the program (False);
      None: `ExperimentBatch`'s default for this platform.

  Returns:
    Each experiment's summary (also in its summary.json), or the `TrainingDivergedError`
    that ended it.

  Raises:
    ConfigError: experiments that cannot share one program (naming the flag), or any
      error a separate run would give.
    RunInterrupted: Ctrl-C or SIGTERM; every run folder resumes.
  """
  configs = [c.validate() for c in configs]
  flags = check_batchable(configs)
  if len(set(workdirs)) < len(workdirs):
    raise ConfigError('--workdir: the experiments of one program need one workdir each')
  workdirs = [
    workdir_lib.open_workdir(os.path.abspath(os.path.expanduser(w)), c)
    for w, c in zip(workdirs, configs)
  ]
  locks = [workdir_lib.lock_workdir(w) for w in workdirs]
  try:
    return _run_batch(configs, workdirs, flags, side_by_side)
  finally:
    for lock in locks:
      lock.close()


def _run_batch(
  configs: list[Config], workdirs: list[str], flags: tuple[str, ...], side_by_side: bool | None
) -> list[dict[str, Any] | Exception]:
  experiments = [build_experiment(c) for c in configs]
  # NotBatchable from the attributes comes before anything is written; one raised while
  # tracing (`_batching`) leaves each folder's config committed and no checkpoint, which a
  # separate run of the same config starts afresh (`studies.compare`'s fallback, tested).
  batch = ExperimentBatch(experiments, flags, side_by_side)
  for config, workdir, exp in zip(configs, workdirs, experiments):
    workdir_lib.commit_workdir(workdir, config)
    workdir_lib.write_file(os.path.join(workdir, 'partition.txt'), exp.partition.table() + '\n')
    workdir_lib.write_file(os.path.join(workdir, 'partition.json'), exp.partition.to_json())
  base_keys = [jax.random.key(c.seed) for c in configs]
  state = batch.init(jnp.stack([jax.random.fold_in(k, 0) for k in base_keys]))
  managers = [
    ocp.CheckpointManager(
      os.path.join(w, checkpoints.CHECKPOINTS), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    for w in workdirs
  ]
  try:
    return _batch_loop(configs, workdirs, batch, state, managers, base_keys)
  finally:
    for manager in managers:
      manager.wait_until_finished()
      manager.close()


def _restore(
  batch: ExperimentBatch, state: Any, managers: list[ocp.CheckpointManager], workdirs: list[str]
) -> tuple[Any, int]:
  """The batch state after the newest round every experiment has checkpointed."""
  driver = Driver()
  restored, done = [], []
  for k, (manager, workdir) in enumerate(zip(managers, workdirs)):
    tree, step = checkpoints.restore_newest_good(manager, driver, take(state, k), workdir)
    restored.append(tree)
    done.append(step)
  common = min(done)
  for k, step in enumerate(done):
    if step == common:
      continue
    if common == 0:
      restored[k] = take(state, k)
    elif common in managers[k].all_steps():
      restored[k], _ = checkpoints.restore_step(managers[k], common, take(state, k))
    else:
      raise NotBatchable(
        f'--workdir {workdirs[k]}: checkpointed round {step}, the others round {common}; '
        'resume it as a separate run'
      )
  if common == 0:
    return state, 0
  return jax.tree.map(lambda *xs: jnp.stack(xs), *restored), common


def _batch_loop(
  configs: list[Config],
  workdirs: list[str],
  batch: ExperimentBatch,
  state: Any,
  managers: list[ocp.CheckpointManager],
  base_keys: list[jax.Array],
) -> list[dict[str, Any] | Exception]:
  config = configs[0]
  state, done = _restore(batch, state, managers, workdirs)
  rows = [run_folder.read_metrics(w, done) for w in workdirs]
  for workdir, written in zip(workdirs, rows):
    workdir_lib.write_metrics(os.path.join(workdir, run_folder.METRICS), written)
  offsets = [written[-1]['elapsed_s'] if written else 0.0 for written in rows]
  log = callbacks.Console() if config.verbose else (lambda *a, **k: None)
  hooks = [
    callbacks.default_callbacks(w, written, m, Driver(), c, lambda *a, **k: None)
    for w, written, m, c in zip(workdirs, rows, managers, configs)
  ]
  failed: dict[int, Exception] = {}
  dropped = [tuple(e.dropout_clients) for e in batch.experiments]
  clocks = [SyncRounds(e) for e in batch.experiments]  # virtual time, as a separate run's
  if done < config.num_rounds:
    log(
      f'{len(configs)} experiments in one program, round {done + 1}/{config.num_rounds}: '
      'compiling the round and the evaluation',
      flush=True,
    )
  t0 = time.perf_counter()
  r = done + 1
  try:
    for r in range(done + 1, config.num_rounds + 1):
      callbacks.stop_if_requested()
      cohorts = np.stack(
        [
          cohort_for_round(
            c.seed,
            r,
            c.num_clients,
            c.join_ratio,
            d if r > c.dropout_round else (),
          )
          for c, d in zip(configs, dropped)
        ]
      )
      rngs = jnp.stack([jax.random.fold_in(k, r) for k in base_keys])
      state, metrics = batch.run_round(state, cohorts, rngs)
      loss, finite = jax.device_get((metrics.loss, metrics.finite))
      evaluate = r % config.eval_every == 0 or r == config.num_rounds
      evaluations = batch.evaluate(state) if evaluate else None
      for k in range(len(configs)):
        if k in failed:
          continue
        report = StepReport(
          cohorts[k],
          np.asarray(loss[k]),
          np.asarray(finite[k]),
          {'virtual_time': clocks[k].virtual_time(r)},
        )
        row = None
        if evaluations is not None:
          row = {
            'round': r,
            **evaluations[k],
            'train_loss': float(np.mean(report.loss)),
            **report.extra,
            'elapsed_s': round(offsets[k] + time.perf_counter() - t0, 3),
          }
        try:
          for hook in hooks[k]:
            hook.after_step(r, report)
          # Only the Checkpoint callback reads the state: slice it on its rounds alone.
          saves = r % config.checkpoint_every == 0 or r == config.num_rounds
          mine = take(state, k) if saves else None
          for hook in hooks[k]:
            hook.after_round(r, mine, row, report)
        except TrainingDivergedError as e:
          failed[k] = e
          log(f'{workdirs[k]}: {e}; the other experiments go on', flush=True)
      log(f'round {r}/{config.num_rounds} of {len(configs)} experiments', flush=True)
  except KeyboardInterrupt:
    callbacks.stop_handled()
    raise RunInterrupted(
      f'interrupted in round {r}/{config.num_rounds}: rerun the same command to resume '
      'every experiment from its last checkpoint'
    ) from None
  finally:
    for experiment_hooks in hooks:
      for hook in experiment_hooks:
        hook.close()
  summaries: list[dict[str, Any] | Exception] = []
  for k, workdir in enumerate(workdirs):
    if k in failed:
      summaries.append(failed[k])
      continue
    summary = run_folder.summarize(rows[k])
    workdir_lib.write_file(os.path.join(workdir, run_folder.SUMMARY), json.dumps(summary, indent=2))
    summaries.append(summary)
  return summaries
