"""A run's folder (its --workdir): what `train.train_and_evaluate` writes and scripts read.

  <workdir>/config.json        the run's Config (`read_config`)
  <workdir>/metrics.jsonl      one JSON object per evaluated round (`read_metrics`)
  <workdir>/checkpoints/<k>/   orbax checkpoints of the state after round k
                               (`restore_latest`)
  <workdir>/summary.json, partition.json, partition.txt, tensorboard/, run.lock

Every reader names the file in a one-line `ConfigError` when it is missing or unreadable.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from apfl_jax.errors import ConfigError

if TYPE_CHECKING:
  from apfl_jax.config import Config
  from apfl_jax.train import Experiment

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'


def read_config_values(workdir: str) -> dict[str, Any]:
  """config.json as written (a run of an older version may lack flags added since)."""
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ConfigError(f'{path}: cannot read it ({e.strerror or e})') from None
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}: not JSON ({e})') from None


def read_config(workdir: str) -> Config:
  """The run's `Config` (flags added since the run take their defaults)."""
  from apfl_jax.config import Config  # config imports every component

  return Config.from_dict(read_config_values(workdir))


def read_metrics(workdir: str, up_to_round: int | None = None) -> list[dict[str, Any]]:
  """The rows of metrics.jsonl (up to `up_to_round`); [] when there is none yet.

  A torn last line (a kill while it was written) is dropped with a one-line warning.

  Raises:
    ConfigError: naming the file when a line before the last is not JSON.
  """
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise ConfigError(
          f'--workdir: line {number} of {path} is not JSON; fix or delete that line'
        ) from None
      logging.warning('dropping the torn last line of %s (a run was killed while writing it)', path)
  if up_to_round is None:
    return rows
  return [r for r in rows if r['round'] <= up_to_round]


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
  from apfl_jax import train  # train imports this module

  config = read_config(workdir)
  if config.server != 'sync':
    raise ConfigError(
      f'{workdir}: restore_latest reads sync runs; this is --server={config.server}'
    )
  experiment = train.build_experiment(config)
  state = experiment.algorithm.init(jax.random.fold_in(jax.random.key(config.seed), 0))
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS))) as manager:
    step = manager.latest_step()
    if step is None:
      raise ConfigError(f'{workdir}: no checkpoint in {os.path.join(workdir, CHECKPOINTS)}')
    state = manager.restore(step, args=ocp.args.StandardRestore(state))
  return experiment, state, step
