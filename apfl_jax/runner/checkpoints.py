"""A run's checkpoints: save, restore the newest one that reads back, legacy layouts.

  <workdir>/checkpoints/<k>/   orbax checkpoint of the state after round k: item `state`
                               (the device pytree) and item `host` (the driver's JSON-able
                               host part: the async clock; {} for sync runs)

A checkpoint that does not restore is moved to `<workdir>/corrupt_checkpoints/` with one
warning line, and the one before it is used.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from apfl_jax.core.errors import ConfigError
from apfl_jax.runner import run_folder
from apfl_jax.runner.experiment import Experiment, build_experiment

if TYPE_CHECKING:
  pass


CHECKPOINTS = 'checkpoints'


# The items of one checkpoint.
STATE = 'state'


HOST = 'host'
# Checkpoints written before the host part moved into them: one item `default` (the device
# pytree) and, for async runs, the clock in <workdir>/clock/<k>.json.
LEGACY_STATE = 'default'
LEGACY_CLOCKS = 'clock'


def save_args(device_tree: Any, host: dict[str, Any]) -> ocp.args.Composite:
  """The orbax arguments that save a driver's state as one checkpoint."""
  return ocp.args.Composite(
    **{STATE: ocp.args.StandardSave(device_tree), HOST: ocp.args.JsonSave(host)}
  )


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
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(device_template), HOST: ocp.args.JsonRestore()}
    ),
  )
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
    # collected later by the filter `_install_orbax_read_filter` installs; one line replaces them.
    with contextlib.redirect_stderr(io.StringIO()):
      try:
        device_tree, host = restore_step(manager, step, rounds.split(tree)[0])
        return rounds.join(device_tree, host), step
      except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types
        failure = type(e).__name__
      gc.collect()
    _install_orbax_read_filter()
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
