"""A run's folder as a place: create, check, lock, write atomically, clean a failed start.

`train.train_and_evaluate` opens the workdir (refusing one that holds another run), locks
it for the run, commits config.json once the run has started and, when a run fails before
its first checkpoint, removes what it created.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import socket
from typing import Any, TextIO

from absl import logging

from apfl_jax.config.config import RESUMABLE_FIELDS, Config, upgrade_config_values
from apfl_jax.core import sharding
from apfl_jax.core.errors import ConfigError
from apfl_jax.runner import run_folder

# The workdir's lock file (see `lock_workdir`).
LOCK_NAME = 'run.lock'


def default_workdir(config: Config) -> str:
  """runs/<dataset>_<algorithm>_<time> under the current directory."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{config.dataset}_{config.algorithm}_{stamp}')


# What a run keeps in its workdir: these folders, and these files.
RUN_FOLDERS = ('checkpoints', 'corrupt_checkpoints', 'tensorboard')
RUN_FILES = (
  'config.json',
  'metrics.jsonl',
  'summary.json',
  'partition.json',
  'partition.txt',
  LOCK_NAME,
)
# The warning about flags a config.json lacks names at most this many of them.
_NAMED_FLAGS = 6


def open_workdir(workdir: str, config: Config) -> str:
  """Creates (or reopens) the workdir and checks that it belongs to this config.

  Nothing is written in it: `commit_workdir` writes config.json once the run has started.
  A workdir with a config.json but neither a checkpoint nor a summary.json holds a start
  that was killed (kill -9) before its first checkpoint: any flags may retry there
  (`remove_abandoned_start` clears it once the workdir is locked).

  Returns:
    The absolute workdir path.

  Raises:
    ConfigError: naming --workdir (or the file) if it cannot be written, is a file, holds
      a file where the run keeps a folder (or the other way round), holds another run, a
      damaged config.json, checkpoints without config.json, or rounds beyond --num_rounds.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir: {workdir} is a file, not a folder; pass another --workdir')
  try:
    os.makedirs(workdir, exist_ok=True)
    # Every process of a multi-process run probes the shared workdir: one name each.
    probe = os.path.join(workdir, f'.write_test.{socket.gethostname()}.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir: cannot write to {workdir}: {e.strerror or e}') from None
  for name in RUN_FOLDERS + RUN_FILES:
    path = os.path.join(workdir, name)
    folder = name in RUN_FOLDERS
    if os.path.exists(path) and os.path.isdir(path) != folder:
      raise ConfigError(
        f'--workdir: {path} is a {"file" if folder else "folder"}, where a run keeps its '
        f'{name} {"folder" if folder else "file"}; move it aside or pass another --workdir'
      )
  config_path = os.path.join(workdir, 'config.json')
  steps = checkpoint_steps(workdir)
  if steps and not os.path.exists(config_path):
    raise ConfigError(
      f'--workdir {workdir} holds checkpoints but no config.json, so which run they belong '
      'to is unknown; move checkpoints/ aside or pass another --workdir'
    )
  if not os.path.exists(config_path):
    return workdir
  previous = upgrade_config_values(run_folder.read_config_values(workdir, resumed=True))
  missing = [key for key in dataclasses.asdict(config) if key not in previous]
  if missing:
    named = ', '.join(f'--{key}' for key in missing[:_NAMED_FLAGS])
    more = len(missing) - _NAMED_FLAGS
    logging.warning(
      "%s was written by a version without %s: its run is used as if it had this run's "
      'values; move it aside if those flags change what the run computes',
      config_path,
      named + (f' and {more} more' if more > 0 else ''),
    )
  if is_abandoned_start(workdir):
    return workdir  # a start killed before its first checkpoint: not a run to resume
  for key, value in dataclasses.asdict(config).items():
    if key in RESUMABLE_FIELDS or key not in previous:
      continue
    if previous[key] != value:
      raise ConfigError(
        f'--workdir {workdir} holds a run with --{key}={previous[key]}, this one has '
        f'--{key}={value}: pass a new --workdir or the same flags'
      )
  if max(steps) > config.num_rounds:
    raise ConfigError(
      f'--num_rounds={config.num_rounds}: --workdir {workdir} holds a checkpoint of round '
      f'{max(steps)} already; pass --num_rounds={max(steps)} or more to re-read or extend '
      'that run, or another --workdir'
    )
  return workdir


def is_abandoned_start(workdir: str) -> bool:
  """Whether the workdir holds what a start killed before its first checkpoint left.

  That is a config.json without a checkpoint, and without the summary.json a finished
  run writes (one whose checkpoints were deleted is still a run).
  """
  return (
    os.path.exists(os.path.join(workdir, 'config.json'))
    and not checkpoint_steps(workdir)
    and not os.path.exists(os.path.join(workdir, 'summary.json'))
  )


def remove_abandoned_start(workdir: str) -> bool:
  """Clears what a start killed before its first checkpoint left (call with the lock held).

  Returns:
    Whether there was such a start (`is_abandoned_start`): its config.json, partition
    files, metrics.jsonl, tensorboard/ and checkpoints/ (only unfinished saves) are
    removed; corrupt_checkpoints/ and foreign files stay.
  """
  if not is_abandoned_start(workdir):
    return False
  for name in RUN_FILES + RUN_FOLDERS:
    path = os.path.join(workdir, name)
    if name in ('corrupt_checkpoints', LOCK_NAME) or not os.path.lexists(path):
      continue
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  return True


def commit_workdir(workdir: str, config: Config) -> None:
  """Writes config.json: from now on the workdir belongs to this config."""
  write_file(os.path.join(workdir, 'config.json'), config.replace(workdir=workdir).to_json())


def lock_workdir(workdir: str) -> TextIO:
  """Takes the workdir's lock file; keep the returned file open for the whole run.

  The lock is an `flock` on `workdir/LOCK_NAME`: the kernel releases it when its holder
  exits, however it exits, so a lock left by a dead process (kill -9) is simply taken.

  Raises:
    ConfigError: naming --workdir when a live process holds the lock.
  """
  path = os.path.join(workdir, LOCK_NAME)
  try:
    lock = open(path, 'a+')
  except OSError as e:
    raise ConfigError(f'--workdir: cannot open {path}: {e.strerror or e}') from None
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
  try:
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()}\n')
    lock.flush()
  except OSError as e:
    lock.close()
    raise ConfigError(f'--workdir: cannot write {path}: {e.strerror or e}') from None
  return lock


def first_missing_folder(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
  missing = None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


def checkpoint_steps(workdir: str) -> list[int]:
  """The rounds of the workdir's finished checkpoints (unfinished saves are not steps)."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return [int(name) for name in os.listdir(folder) if name.isdigit()]


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def remove_failed_start(workdir: str, created: str | None, entries_before: set[str]) -> None:
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


def write_file(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a temporary file, then a rename).

  In a multi-process run only process 0 writes the run's files (the others return at
  once), so one temporary name serves.

  Raises:
    ConfigError: naming --workdir and the file when it cannot be written (disk full).
  """
  if not sharding.is_main_process():
    return
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    raise ConfigError(f'--workdir: cannot write {path}: {e.strerror or e}') from None


def write_metrics(path: str, rows: list[dict[str, Any]]) -> None:
  write_file(path, ''.join(json.dumps(r) + '\n' for r in rows))
