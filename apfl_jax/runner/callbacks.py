"""Hooks around the round loop of `train.train_and_evaluate`.

The loop (`train._round_loop`) only steps, evaluates and calls these, in list order:

  for each round r:
    tree, report = driver.step(tree, r, rng)          # SyncRounds / AsyncRounds
    callback.after_step(r, report)                     # e.g. DivergenceCheck
    row = evaluation metrics when r is evaluated, else None
    callback.after_round(r, tree, row, report)         # metrics, TensorBoard, ckpt, progress
  callback.close()                                     # always, also after an error

A callback that raises ends the run with that error. `MetricsLog` comes before
`Checkpoint`, so a checkpoint of round r never exists without round r's metrics line.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
import numpy as np
import orbax.checkpoint as ocp
import tensorboardX

from apfl_jax.core import sharding
from apfl_jax.core.errors import ConfigError, TrainingDivergedError
from apfl_jax.runner import checkpoints


class Callback:
  """Base class: every hook does nothing."""

  def after_step(self, round_index: int, report: Any) -> None:
    """After the round's training, before its evaluation.

    Args:
      round_index: the round (1-based).
      report: the driver's `train.StepReport`.
    """
    del round_index, report

  def after_round(
    self, round_index: int, tree: Any, row: dict[str, Any] | None, report: Any
  ) -> None:
    """After the round (and its evaluation, if any).

    Args:
      round_index: the round (1-based).
      tree: the driver's state after the round.
      row: the round's metrics.jsonl row, or None when it is not evaluated.
      report: the driver's `train.StepReport`.
    """
    del round_index, tree, row, report

  def close(self) -> None:
    """At the end of the loop, also when it ends with an error."""


class DivergenceCheck(Callback):
  """Stops the run at the first client whose loss or parameters are not finite.

  Args:
    step_flags: the flags that scale the run's client steps, named in the error.
  """

  def __init__(self, step_flags: str = '--learning_rate'):
    self.step_flags = step_flags

  def after_step(self, round_index: int, report: Any) -> None:
    if not np.all(report.finite):
      bad = int(report.clients[np.flatnonzero(~report.finite)[0]])
      raise TrainingDivergedError(
        f'NaN/Inf in training at round {round_index}, client {bad} (try a lower {self.step_flags})'
      )


class MetricsLog(Callback):
  """Appends each evaluated round's row to metrics.jsonl (and to `rows`)."""

  def __init__(self, path: str, rows: list[dict[str, Any]]):
    self.path = path
    self.rows = rows

  def after_round(self, round_index, tree, row, report):
    if row is None:
      return
    self.rows.append(row)
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    except OSError as e:
      raise ConfigError(f'--workdir: cannot write {self.path}: {e.strerror or e}') from None


class TensorBoard(Callback):
  """Writes every float metric of an evaluated round as a TensorBoard scalar."""

  def __init__(self, logdir: str):
    self.board = tensorboardX.SummaryWriter(logdir)

  def after_round(self, round_index, tree, row, report):
    if row is None:
      return
    for key, value in row.items():
      if key != 'round' and isinstance(value, float):
        self.board.add_scalar(key, value, round_index)
    self.board.flush()

  def close(self) -> None:
    self.board.close()


class Checkpoint(Callback):
  """Saves the driver's state every `every` rounds and after the last one."""

  def __init__(
    self,
    manager: ocp.CheckpointManager,
    driver: Any,
    every: int,
    num_rounds: int,
    workdir: str = '',
  ):
    self.manager = manager
    self.driver = driver
    self.every = every
    self.num_rounds = num_rounds
    self.workdir = workdir  # named when a save fails (a full disk)

  def after_round(self, round_index, tree, row, report):
    if round_index % self.every == 0 or round_index == self.num_rounds:
      with checkpoints.write_errors(self.workdir):
        self.manager.save(round_index, args=checkpoints.save_args(*self.driver.split(tree)))


class Console:
  """`print` for the run's progress lines: a closed or full stdout stops them, not the run.

  When stdout cannot be written (`| head -1` closed the pipe, `> /dev/full`), one warning
  line goes to stderr, stdout is pointed at /dev/null (so that nothing fails again when
  Python flushes it at exit) and the run goes on without progress lines.
  """

  def __init__(self) -> None:
    self.broken = False

  def __call__(self, *args: Any, **kwargs: Any) -> None:
    if self.broken:
      return
    try:
      print(*args, **kwargs)
    except OSError as e:  # BrokenPipeError, ENOSPC, EBADF
      self.broken = True
      try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
      except (OSError, ValueError, AttributeError):
        pass
      logging.warning(
        'stdout cannot be written (%s): progress lines are dropped, the run goes on',
        e.strerror or type(e).__name__,
      )


class Progress(Callback):
  """One line a round: loss, accuracies when evaluated, round time and ETA."""

  def __init__(self, log: Callable[..., None], num_rounds: int):
    self.log = log
    self.num_rounds = num_rounds
    self.round_times: list[float] = []
    self.started = time.perf_counter()

  def after_round(self, round_index, tree, row, report):
    now = time.perf_counter()
    self.round_times.append(now - self.started)
    self.started = now
    eta = np.median(self.round_times[-10:]) * (self.num_rounds - round_index)
    accuracy = ''
    if row is not None:
      accuracy = f' personalized {row["personalized_acc"]:.4f}' + (
        '' if row['global_acc'] is None else f' global {row["global_acc"]:.4f}'
      )
    self.log(
      f'round {round_index}/{self.num_rounds} loss {np.mean(report.loss):.4f}{accuracy} '
      f'{self.round_times[-1]:.2f}s ETA {datetime.timedelta(seconds=int(eta))}',
      flush=True,
    )


_STOP = threading.Event()


def request_stop() -> None:
  """Asks the round loop to end as Ctrl-C does, at the next round at the latest.

  main.py's SIGTERM/SIGHUP handler calls it before raising KeyboardInterrupt, which Python
  swallows where it lands in a `__del__` or a garbage-collector callback: the loop then
  still stops (`stop_if_requested`).
  """
  _STOP.set()


def stop_if_requested() -> None:
  """Raises KeyboardInterrupt if a stop was requested and not yet acted on."""
  if _STOP.is_set():
    raise KeyboardInterrupt


def stop_handled() -> None:
  """Marks a requested stop as acted on (the loop caught its KeyboardInterrupt)."""
  _STOP.clear()


def default_callbacks(
  workdir: str,
  rows: list[dict[str, Any]],
  manager: ocp.CheckpointManager,
  driver: Any,
  config: Any,
  log: Callable[..., None],
) -> list[Callback]:
  """The run's callbacks, in order: divergence, metrics, TensorBoard, checkpoint, progress.

  In a multi-process run every process checkpoints (each writes its share of one orbax
  checkpoint) while process 0 alone writes metrics.jsonl and TensorBoard (`log` prints
  only there).
  """
  main = sharding.is_main_process()
  return [
    # FedGen's regulariser weights multiply the learning rate on its generated batches.
    DivergenceCheck(
      '--learning_rate, --fedgen_alpha or --fedgen_beta'
      if config.algorithm == 'fedgen'
      else '--learning_rate'
    ),
    MetricsLog(os.path.join(workdir, 'metrics.jsonl') if main else os.devnull, rows),
    *([TensorBoard(os.path.join(workdir, 'tensorboard'))] if main else []),
    Checkpoint(manager, driver, config.checkpoint_every, config.num_rounds, workdir),
    Progress(log, config.num_rounds),
  ]
