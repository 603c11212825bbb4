"""Checks that a study's output can be written, before the study does its work.

A study that finds out only at the end that `--out` is a folder, a file, or under a file
loses its work. `check_output_file` and `check_output_folder` find the nearest folder that
exists on the way to the path and try a write there, so such a path ends the study in one
line at once. They create nothing: the study makes the missing folders when it writes.
Light on purpose (no jax): `experiments/benchmark.py`'s parent process imports it.
"""

from __future__ import annotations

import os
import tempfile

from apfl_jax.core.errors import ConfigError


def _probe(folder: str, flag: str, path: str) -> None:
  """Checks that `folder` exists or can be made, by a write in its nearest existing folder."""
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f'--{flag}: cannot write {path}: {existing} is a file')
  try:
    with tempfile.NamedTemporaryFile(dir=existing, prefix='.write_test'):
      pass
  except OSError as e:
    raise ConfigError(f'--{flag}: cannot write {path}: {e.strerror or e}') from None


def check_output_file(path: str, flag: str) -> str:
  """Checks that the file `path` (the value of --`flag`) can be written.

  Its folder may be missing (the study makes it). An existing file is overwritten later.

  Returns:
    The absolute path.

  Raises:
    ConfigError: naming --`flag`, when `path` is empty, a folder, or cannot be written.
  """
  if not path:
    raise ConfigError(f'--{flag} is required: the file to write')
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    raise ConfigError(f'--{flag}: {path} is a folder, not a file')
  _probe(os.path.dirname(path), flag, path)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise ConfigError(f'--{flag}: cannot write {path}: it is read-only')
  return path


def check_output_folder(path: str, flag: str) -> str:
  """Checks that files can be written in the folder `path` (the value of --`flag`).

  It may be missing (the study makes it).

  Returns:
    The absolute path.

  Raises:
    ConfigError: naming --`flag`, when `path` is empty, a file, or cannot be written.
  """
  if not path:
    raise ConfigError(f'--{flag} is required: the folder to write to')
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'--{flag}: {path} is a file, not a folder')
  _probe(path, flag, path)
  return path
