"""A run's checkpoints: save, restore the newest one that reads back, legacy layouts.

  <workdir>/checkpoints/<k>/   orbax checkpoint of the state after round k: item `state`
                               (the device pytree), item `host` (the driver's JSON-able
                               host part: the async clock; {} for sync runs) and item
                               `checksum` (sha256 of both, as saved)

A checkpoint that does not restore, or whose restored contents do not match its checksum
(a flipped bit), is moved to `<workdir>/corrupt_checkpoints/` with one warning line, and
the one before it is used. Checkpoints written before the checksum restore unverified.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import gc
import hashlib
import io
import json
import logging as python_logging
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from apfl_jax.core import sharding
from apfl_jax.core.errors import ConfigError
from apfl_jax.runner import run_folder
from apfl_jax.runner.experiment import Experiment, build_experiment

if TYPE_CHECKING:
  pass


CHECKPOINTS = 'checkpoints'


# The items of one checkpoint.
STATE = 'state'


HOST = 'host'
# sha256 of the state's arrays and of the host part as saved ({'state': hex, 'host': hex};
# 'state' is None when this process does not hold every array whole: multi-host shards).
CHECKSUM = 'checksum'
# Checkpoints written before the host part moved into them: one item `default` (the device
# pytree) and, for async runs, the clock in <workdir>/clock/<k>.json.
LEGACY_STATE = 'default'
LEGACY_CLOCKS = 'clock'


class ChecksumMismatch(Exception):
  """A checkpoint restored, but not to what was saved (its bytes were damaged since)."""


# What a damaged checkpoint raises while it is read: orbax, tensorstore and json report a
# missing or garbled file as one of these (tensorstore's errors are ValueErrors), and orbax
# a truncated array file as a bare `Exception` (`is_read_error`). Anything else
# (AttributeError, TypeError, NameError, ... from the caller's code) is not the
# checkpoint's fault and propagates: it must not move good checkpoints aside.
READ_ERRORS: tuple[type[Exception], ...] = (
  OSError,
  ValueError,
  KeyError,
  IndexError,
  EOFError,
  ChecksumMismatch,
)


def is_read_error(error: BaseException) -> bool:
  """Whether `error`, raised by `restore_step`, says the checkpoint is damaged."""
  return isinstance(error, READ_ERRORS) or type(error) is Exception


def _host_copy(leaf: Any) -> np.ndarray | None:
  """The leaf's values on this host; None when this process holds only part of it."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      shard = leaf.addressable_shards[0].data
      if shard.shape != leaf.shape:
        return None
      leaf = shard
  return np.asarray(leaf)


def tree_sha256(tree: Any) -> str | None:
  """sha256 of every leaf's dtype, shape and bytes, in tree order (None: multi-host shards)."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    array = _host_copy(leaf)
    if array is None:
      return None
    digest.update(f'{array.dtype.str}{array.shape}'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def host_sha256(host: dict[str, Any]) -> str:
  """sha256 of the host part as JSON (tuples and lists, as saved and as restored, agree)."""
  return hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()


def save_args(device_tree: Any, host: dict[str, Any]) -> ocp.args.Composite:
  """The orbax arguments that save a driver's state as one checkpoint, with its checksum."""
  checksum = {'state': tree_sha256(device_tree), 'host': host_sha256(host)}
  return ocp.args.Composite(
    **{
      STATE: ocp.args.StandardSave(device_tree),
      HOST: ocp.args.JsonSave(host),
      CHECKSUM: ocp.args.JsonSave(checksum),
    }
  )


def verify(device_tree: Any, host: dict[str, Any], checksum: dict[str, Any]) -> None:
  """Raises ChecksumMismatch when a restored checkpoint differs from what was saved."""
  state = checksum.get('state')
  if state is not None and tree_sha256(device_tree) not in (None, state):
    raise ChecksumMismatch('the state differs from its checksum')
  if host_sha256(host) != checksum.get('host'):
    raise ChecksumMismatch('the host part differs from its checksum')


def restore_step(
  manager: ocp.CheckpointManager, step: int, device_template: Any
) -> tuple[Any, dict[str, Any]]:
  """Restores checkpoint `step` of `manager` (a run's `checkpoints/` folder).

  Args:
    manager: the checkpoint manager of the run's folder.
    step: the round to restore.
    device_template: a state of the same structure (shapes, dtypes, shardings).

  Returns:
    (device pytree, host part); the host part of a legacy checkpoint comes from its
    clock/<step>.json, or is {} when the run wrote none (sync).

  Raises:
    ChecksumMismatch: the restored contents differ from the checksum saved with them.
    One of `READ_ERRORS`: a missing, truncated or garbled file.
  """
  folder = os.fspath(manager.directory)
  legacy = os.path.join(folder, str(step), LEGACY_STATE)
  if os.path.isdir(legacy):
    # Read without the manager: one manager cannot mix single-item and composite steps.
    with ocp.StandardCheckpointer() as checkpointer:
      device_tree = checkpointer.restore(legacy, device_template)
    clock = os.path.join(os.path.dirname(folder), LEGACY_CLOCKS, f'{step}.json')
    host: dict[str, Any] = {}
    if os.path.exists(clock):
      with open(clock) as f:
        host = {'clock': json.load(f)}
    return device_tree, host
  items = {STATE: ocp.args.StandardRestore(device_template), HOST: ocp.args.JsonRestore()}
  # A checkpoint saved before the checksum existed restores unverified.
  checked = os.path.isdir(os.path.join(folder, str(step), CHECKSUM))
  if checked:
    items[CHECKSUM] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if checked:
    if not isinstance(restored[CHECKSUM], dict) or not isinstance(restored[HOST], dict):
      raise ChecksumMismatch('its checksum or host part is not a JSON object')
    verify(restored[STATE], restored[HOST], restored[CHECKSUM])
  return restored[STATE], restored[HOST]


def restore_latest(workdir: str) -> tuple[Experiment, Any, int]:
  """Rebuilds a finished or interrupted sync run's experiment and its newest state.

  Args:
    workdir: the run's folder.

  Returns:
    (the experiment of its config, the state after the newest checkpointed round, that
    round).

  Raises:
    ConfigError: no readable config.json, or no checkpoint.
  """
  config = run_folder.read_config(workdir)
  if config.server != 'sync':
    raise ConfigError(
      f'{workdir}: restore_latest reads sync runs; this is --server={config.server}'
    )
  experiment = build_experiment(config)
  state = experiment.algorithm.init(jax.random.fold_in(jax.random.key(config.seed), 0))
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS))) as manager:
    step = manager.latest_step()
    if step is None:
      raise ConfigError(f'{workdir}: no checkpoint in {os.path.join(workdir, CHECKPOINTS)}')
    state, _ = restore_step(manager, step, state)
  return experiment, state, step


# tensorstore names the OS error of a failed write: '... No space left on device
# [os_error_code='28']'.
_OS_ERROR = re.compile(r"([A-Z][A-Za-z ]+) \[os_error_code='\d+'\]")


def _write_failure(error: BaseException) -> str | None:
  """The reason an orbax save failed for want of a writable disk; None for other errors."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error.strerror or str(error)
    match = _OS_ERROR.search(str(error))
    if match:
      return match.group(1)
    error = error.__cause__ or error.__context__  # type: ignore[assignment]
  return None


class _DropOrbaxErrors(python_logging.Filter):
  """Drops orbax's ERROR log lines (with tracebacks) about a failed background save.

  The failure is raised again in the main thread, where `write_errors` makes it one line.
  """

  def filter(self, record: python_logging.LogRecord) -> bool:
    return not (
      record.levelno == python_logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname
    )


@contextlib.contextmanager
def write_errors(workdir: str) -> Iterator[None]:
  """Turns orbax's failures to write a checkpoint (full disk, removed folder) into one line.

  Raises:
    ConfigError: naming --workdir and the OS error, for a save that failed for want of a
      writable disk; other errors propagate unchanged.
  """
  absl_logger = python_logging.getLogger('absl')
  if not any(isinstance(f, _DropOrbaxErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxErrors())
  try:
    yield
  except Exception as e:
    reason = _write_failure(e)
    if reason is None or isinstance(e, ConfigError):
      raise
    _install_orbax_read_filter()  # the failed save's callbacks also fail, later
    raise ConfigError(
      f'--workdir: cannot write a checkpoint in {os.path.join(workdir, CHECKPOINTS)}: {reason}'
      '; the checkpoints saved before it are kept'
    ) from None


class WithoutClosedLoopTracebacks(io.TextIOBase):
  """A stderr that drops the tracebacks of orbax's failed-save callbacks.

  After a checkpoint write fails (a full disk), the save's tensorstore callbacks go on
  failing in orbax's threads while the run winds down, each printing a traceback that
  ends in `RuntimeError: Event loop is closed` (without any hook to catch it). A command
  line that promises one line installs this: a traceback is held until its last line and
  dropped if that is the closed event loop; everything else passes unchanged.
  """

  _LAST_LINE = 'RuntimeError: Event loop is closed'

  def __init__(self, stream: Any):
    super().__init__()
    self._stream = stream
    self._held: dict[int, list[str]] = {}  # per thread: tracebacks from threads interleave
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    with self._lock:
      held = self._held.setdefault(threading.get_ident(), [])
      if not held and not text.startswith('Traceback (most recent call last)'):
        self._stream.write(text)
        return len(text)
      held.append(text)
      lines = ''.join(held).splitlines()
      if held[-1].endswith('\n') and lines and not lines[-1].startswith((' ', 'Traceback')):
        if lines[-1].strip() != self._LAST_LINE:
          self._stream.write(''.join(held))
        held.clear()
      return len(text)

  def flush(self) -> None:
    self._stream.flush()


def finish(manager: ocp.CheckpointManager, workdir: str, failed: bool = False) -> None:
  """Waits for the save in flight, then closes `manager` (also when a save failed).

  Args:
    manager: the run's checkpoint manager.
    workdir: the run's folder.
    failed: the run is ending with an error already: a failed save is not raised over it.
      A failed save's leftover tensorstore callbacks fail later (event loop closed); the
      filter `_install_orbax_read_filter` installs drops their reports.

  Raises:
    ConfigError: (not `failed`) the save failed for want of a writable disk.
  """
  try:
    with write_errors(workdir):
      manager.wait_until_finished()
  except Exception:
    if not failed:
      failed = True
      raise
  finally:
    if failed:
      _install_orbax_read_filter()
    with contextlib.suppress(Exception):  # the failed save's error, raised again
      manager.close()


def is_abandoned_orbax_read(unraisable: Any) -> bool:
  """Whether an unraisable exception comes from an orbax read abandoned by a failed restore.

  Such coroutines' finalizers can also run after the read's event loop has closed, which
  Python reports as an unraisable RuntimeError('Event loop is closed') without an object.

  Args:
    unraisable: the argument of `sys.unraisablehook`.
  """
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None and 'orbax' in code.co_filename:
    return True
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _install_orbax_read_filter() -> None:
  """Makes `sys.unraisablehook` drop abandoned orbax reads (once per process)."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_orbax_reads', False):
    return

  def hook(unraisable: Any) -> None:
    if not is_abandoned_orbax_read(unraisable):
      previous(unraisable)

  hook.drops_abandoned_orbax_reads = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def restore_newest_good(
  manager: ocp.CheckpointManager, rounds: Any, tree: Any, workdir: str
) -> tuple[Any, int]:
  """Restores the newest checkpoint that reads back.

  A checkpoint that fails to restore (a truncated or garbled file, contents that differ
  from their checksum) is moved to `workdir/corrupt_checkpoints/` with a one-line warning,
  and the one before it is tried. Other errors (not one of `READ_ERRORS`) propagate and
  move nothing.

  Args:
    manager: the run's checkpoint manager.
    rounds: the `Driver` (joins the restored device pytree and host part).
    tree: the driver's freshly initialised state (the structure to restore into).
    workdir: the run's folder.

  Returns:
    (state, last round it holds); (tree, 0) when no checkpoint restores.
  """
  template = rounds.split(tree)[0]
  for step in sorted(manager.all_steps(), reverse=True):
    failure = None
    # A failed read leaves orbax coroutines behind whose tracebacks Python prints when they
    # are collected: those collected here are printed into a captured stderr, those
    # collected later by the filter `_install_orbax_read_filter` installs; one line replaces them.
    with contextlib.redirect_stderr(io.StringIO()):
      try:
        device_tree, host = restore_step(manager, step, template)
      except Exception as e:  # noqa: BLE001 -- only read errors; the others are re-raised
        if not is_read_error(e):
          raise
        failure = str(e) if isinstance(e, ChecksumMismatch) else type(e).__name__
      if failure is not None:
        gc.collect()
    if failure is None:
      return rounds.join(device_tree, host), step
    _install_orbax_read_filter()
    # Every process of a job reads the same checkpoint and finds the same failure; process
    # 0 moves the folder, the others wait for it before looking again.
    if sharding.is_main_process():
      aside = os.path.join(workdir, 'corrupt_checkpoints', f'{step}-{time.time_ns()}')
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(workdir, 'checkpoints', str(step)), aside)
      logging.warning(
        'checkpoint of round %d does not restore (%s); moved it to %s and trying the previous one',
        step,
        failure,
        aside,
      )
    sharding.barrier(f'corrupt checkpoint {step} moved aside')
    manager.reload()
  return tree, 0
