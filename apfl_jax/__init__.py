"""apfl_jax: a JAX/Flax simulator for (asynchronous) personalized federated learning.

The public API, for scripts that drive the simulator without the command line:

  import apfl_jax

  config = apfl_jax.Config(algorithm='apfl', dataset='fashion_mnist', num_rounds=5)
  summary = apfl_jax.train_and_evaluate(config, '/tmp/apfl_run')
  rows = apfl_jax.read_metrics('/tmp/apfl_run')

Layers, each a sub-package, dependencies one way (`tests/test_layering.py`):
core < data, models < algorithms < asynchrony < config < runner < studies.
Names are loaded on first use, so `import apfl_jax.core.errors` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> (module, attribute).
_EXPORTS = {
  # Running experiments.
  'train_and_evaluate': ('apfl_jax.runner.train', 'train_and_evaluate'),
  'Config': ('apfl_jax.config.config', 'Config'),
  'define_flags': ('apfl_jax.config.config', 'define_flags'),
  'from_flags': ('apfl_jax.config.config', 'from_flags'),
  'build_experiment': ('apfl_jax.runner.experiment', 'build_experiment'),
  'Experiment': ('apfl_jax.runner.experiment', 'Experiment'),
  # Reading a run's folder.
  'read_config': ('apfl_jax.runner.run_folder', 'read_config'),
  'read_metrics': ('apfl_jax.runner.run_folder', 'read_metrics'),
  'restore_latest': ('apfl_jax.runner.checkpoints', 'restore_latest'),
  # Writing an algorithm.
  'Algorithm': ('apfl_jax.algorithms.base', 'Algorithm'),
  'AlgorithmState': ('apfl_jax.algorithms.base', 'AlgorithmState'),
  'ClientOutput': ('apfl_jax.algorithms.base', 'ClientOutput'),
  'BuildContext': ('apfl_jax.algorithms.registry', 'BuildContext'),
  'register': ('apfl_jax.algorithms.registry', 'register'),
  'algorithm_names': ('apfl_jax.algorithms.registry', 'names'),
  'create_algorithm': ('apfl_jax.algorithms', 'create_algorithm'),
  'Options': ('apfl_jax.core.options', 'Options'),
  'option': ('apfl_jax.core.options', 'option'),
  'train_client': ('apfl_jax.core.local_training', 'train_client'),
  'Schedule': ('apfl_jax.core.local_training', 'Schedule'),
  # Running per-client functions over a cohort, on one device or a mesh.
  'ClientMap': ('apfl_jax.core.cohort', 'ClientMap'),
  'client_mesh': ('apfl_jax.core.sharding', 'client_mesh'),
  # Data and models.
  'load_dataset': ('apfl_jax.data.datasets', 'load_dataset'),
  'partition_dataset': ('apfl_jax.data.partition', 'partition_dataset'),
  'create_model': ('apfl_jax.models', 'create_model'),
  # Errors: a UserError ends a run with one line naming the flag or file.
  'UserError': ('apfl_jax.core.errors', 'UserError'),
  'ConfigError': ('apfl_jax.core.errors', 'ConfigError'),
  'DataUnavailableError': ('apfl_jax.core.errors', 'DataUnavailableError'),
  'TrainingDivergedError': ('apfl_jax.core.errors', 'TrainingDivergedError'),
  'RunInterrupted': ('apfl_jax.core.errors', 'RunInterrupted'),
}

__all__ = [
  'Algorithm',
  'AlgorithmState',
  'BuildContext',
  'ClientMap',
  'ClientOutput',
  'Config',
  'ConfigError',
  'DataUnavailableError',
  'Experiment',
  'Options',
  'RunInterrupted',
  'Schedule',
  'TrainingDivergedError',
  'UserError',
  'algorithm_names',
  'build_experiment',
  'client_mesh',
  'create_algorithm',
  'create_model',
  'define_flags',
  'from_flags',
  'load_dataset',
  'option',
  'partition_dataset',
  'read_config',
  'read_metrics',
  'register',
  'restore_latest',
  'train_and_evaluate',
  'train_client',
]

if TYPE_CHECKING:
  from apfl_jax.algorithms import create_algorithm
  from apfl_jax.algorithms.base import Algorithm, AlgorithmState, ClientOutput
  from apfl_jax.algorithms.registry import BuildContext, register
  from apfl_jax.algorithms.registry import names as algorithm_names
  from apfl_jax.config.config import Config, define_flags, from_flags
  from apfl_jax.core.cohort import ClientMap
  from apfl_jax.core.errors import (
    ConfigError,
    DataUnavailableError,
    RunInterrupted,
    TrainingDivergedError,
    UserError,
  )
  from apfl_jax.core.local_training import Schedule, train_client
  from apfl_jax.core.options import Options, option
  from apfl_jax.core.sharding import client_mesh
  from apfl_jax.data.datasets import load_dataset
  from apfl_jax.data.partition import partition_dataset
  from apfl_jax.models import create_model
  from apfl_jax.runner.checkpoints import restore_latest
  from apfl_jax.runner.experiment import Experiment, build_experiment
  from apfl_jax.runner.run_folder import read_config, read_metrics
  from apfl_jax.runner.train import train_and_evaluate


def __getattr__(name: str) -> Any:
  """Loads a public name on first use (PEP 562)."""
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
