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
from typing import Any, TextIO

from absl import logging

from apfl_jax.config.config import RESUMABLE_FIELDS, Config, upgrade_config_values
from apfl_jax.core.errors import ConfigError
from apfl_jax.runner import run_folder

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
    previous = upgrade_config_values(run_folder.read_config_values(workdir))
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
  write_file(os.path.join(workdir, 'config.json'), config.replace(workdir=workdir).to_json())


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


def first_missing_folder(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
  missing = None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


def has_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


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


def write_metrics(path: str, rows: list[dict[str, Any]]) -> None:
  write_file(path, ''.join(json.dumps(r) + '\n' for r in rows))
