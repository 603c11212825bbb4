"""Federated algorithms, one file each, behind `apfl_jax.algorithms.base.Algorithm`.

Importing this package imports every module in it, so every algorithm registered with
`registry.register` is found by `--algorithm=NAME` (see registry.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from apfl_jax.algorithms import registry
from apfl_jax.algorithms.base import Algorithm
from apfl_jax.core import local_training

if TYPE_CHECKING:
  from apfl_jax.config.config import Config

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f'{__name__}.{_module.name}')


def create_algorithm(
  config: Config, model: Any, dataset: Any, partition: Any, schedule: local_training.Schedule
) -> Algorithm:
  """The algorithm registered under --algorithm, built from the config.

  Args:
    config: the experiment config.
    model: the Flax model every client trains.
    dataset: the data set (image shape, class names, pixel statistics).
    partition: the client partition (label counts).
    schedule: the static local-training schedule.

  Returns:
    The algorithm object.
  """
  config = config.with_algorithm_defaults()
  context = registry.BuildContext(
    model=model,
    dataset=dataset,
    partition=partition,
    schedule=schedule,
    client_optimizer=local_training.make_optimizer(config.client_optimizer, config.learning_rate),
    server_optimizer=local_training.make_optimizer(
      config.server_optimizer, config.server_learning_rate
    ),
  )
  return registry.get(config.algorithm).cls.from_config(config, context)
