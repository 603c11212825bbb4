"""A run's folder (its --workdir): what `train.train_and_evaluate` writes and scripts read.

  <workdir>/config.json        the run's Config (`read_config`)
  <workdir>/metrics.jsonl      one JSON object per evaluated round (`read_metrics`)
  <workdir>/checkpoints/<k>/   orbax checkpoint of the state after round k: item `state`
                               (the device pytree) and item `host` (the driver's JSON-able
                               host part: the async clock; {} for sync runs)
                               (`save_args`, `restore_step`, `restore_latest`)
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
    state, _ = restore_step(manager, step, state)
  return experiment, state, step
