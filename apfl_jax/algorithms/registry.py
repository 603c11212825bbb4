"""The algorithm registry: `--algorithm=NAME` finds the class registered under NAME.

An algorithm is one module in `apfl_jax/algorithms/` that registers its class:

    @registry.register('fedprox', options=FedProxOptions)
    class FedProx(FedAvg):
      @classmethod
      def from_config(cls, config, context): ...

`apfl_jax.algorithms` imports every module of the package, so a new file is found with no
other edit; its options dataclass (`apfl_jax.core.options.Options`) becomes part of `Config` and
its fields become flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from apfl_jax.algorithms.base import Algorithm
from apfl_jax.core import local_training


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What `from_config` gets besides the config: everything built before the algorithm.

  Attributes:
    model: the Flax model every client trains.
    dataset: the data set (image shape, class names, pixel statistics).
    partition: the client partition (label counts).
    schedule: the static local-training schedule (`local_training.Schedule`).
    client_optimizer: the clients' optimizer (`local_training.Optimizer`).
    server_optimizer: the server's optimizer.
  """

  model: Any
  dataset: Any
  partition: Any
  schedule: Any
  client_optimizer: local_training.OptimizerLike
  server_optimizer: local_training.OptimizerLike

  def fedavg_args(
    self,
  ) -> tuple[Any, Any, Any, local_training.OptimizerLike, local_training.OptimizerLike]:
    """(model, image shape, schedule, client and server optimizer): the arguments
    `FedAvg(...)` takes, which its subclasses take first."""
    return (
      self.model,
      self.dataset.image_shape,
      self.schedule,
      self.client_optimizer,
      self.server_optimizer,
    )


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered algorithm.

  Attributes:
    name: its `--algorithm` value.
    cls: the class; `cls.from_config(config, context)` builds it.
    options: its options dataclass (fields are flags), or None.
    defaults: values that flags left at their "algorithm's default" sentinel take for this
      algorithm (e.g. {'generator': 'image'}).
  """

  name: str
  cls: type[Algorithm]
  options: type | None
  defaults: Mapping[str, Any]


_ENTRIES: dict[str, Entry] = {}


def register(
  name: str, options: type | None = None, defaults: Mapping[str, Any] | None = None
) -> Callable[[type[Algorithm]], type[Algorithm]]:
  """Class decorator registering an algorithm under `name`.

  Args:
    name: the `--algorithm` value.
    options: the algorithm's options dataclass, or None if it has no flags of its own.
    defaults: {flag: value} for flags whose default depends on the algorithm.

  Returns:
    The decorator (it returns the class unchanged).
  """

  def decorate(cls: type[Algorithm]) -> type[Algorithm]:
    old = _ENTRIES.get(name)
    if old is not None and (old.cls.__module__, old.cls.__qualname__) != (
      cls.__module__,
      cls.__qualname__,
    ):
      raise ValueError(f'algorithm {name!r} is registered twice')
    _ENTRIES[name] = Entry(name, cls, options, dict(defaults or {}))
    return cls

  return decorate


def names() -> tuple[str, ...]:
  """Every registered algorithm name, in registration order."""
  return tuple(_ENTRIES)


def get(name: str) -> Entry:
  """The entry registered under `name` (KeyError if none)."""
  return _ENTRIES[name]


def option_classes() -> tuple[type, ...]:
  """The registered algorithms' options classes, each once, in registration order."""
  classes: list[type] = []
  for entry in _ENTRIES.values():
    if entry.options is not None and entry.options not in classes:
      classes.append(entry.options)
  return tuple(classes)
