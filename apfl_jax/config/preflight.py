"""Checks of the flags against the loaded data set and the device, before heavy work.

`Config.validate()` knows only the flags. Sizes that are impossible for the data set
(more clients than examples, more classes per client than classes, a batch larger than
any client) or for the device (a round whose activations cannot fit) would otherwise
end in minutes of Dirichlet redraws, a silently different split, or an XLA
`RESOURCE_EXHAUSTED` traceback. `check_data` runs after loading and before the
partition; `check_round` after the partition, before anything is compiled. Each raises
a one-line `ConfigError` naming the flag.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.config.config import Config
from apfl_jax.core.errors import ConfigError

# Bytes kept per activation value in training: the forward value, its gradient, and a
# copy for im2col patches or the optimizer's temporaries (a deliberate over-estimate).
_TRAIN_BYTES_PER_ACTIVATION = 3 * 4


def check_data(
  config: Config, train_labels: np.ndarray, num_classes: int, dataset_name: str
) -> None:
  """Checks the client, class and batch sizes against the data set, before the partition.

  Args:
    config: a validated config.
    train_labels: the labels that are partitioned (the pool with --test_split=pooled).
    num_classes: classes of the data set.
    dataset_name: for the message.

  Raises:
    ConfigError: naming the flag whose value the data set cannot satisfy.
  """
  n = len(train_labels)
  of_data = f'the {n} training examples of {dataset_name}'
  if config.num_clients > n:
    raise ConfigError(f'--num_clients={config.num_clients} is more than {of_data}')
  if config.partition == 'dirichlet':
    needed = config.num_clients * config.min_samples_per_client
    if needed > n:
      raise ConfigError(
        f'--num_clients={config.num_clients} x --min_samples_per_client='
        f'{config.min_samples_per_client} = {needed} is more than {of_data}; lower one'
      )
  if config.partition == 'pathological' and config.classes_per_client > num_classes:
    raise ConfigError(
      f'--classes_per_client={config.classes_per_client} is more than the '
      f'{num_classes} classes of {dataset_name}'
    )
  if config.partition == 'monopoly':
    left = num_classes - config.monopoly_clients * config.monopoly_classes_per_client
    if 0 < left < config.classes_per_client:
      raise ConfigError(
        f'--classes_per_client={config.classes_per_client} is more than the {left} '
        f'classes of {dataset_name} that the monopoly clients leave to the others'
      )
  if config.batch_size > n:
    raise ConfigError(f'--batch_size={config.batch_size} is more than {of_data}')


def check_round(
  config: Config,
  client_counts: np.ndarray,
  model: Any,
  image_shape: tuple[int, ...],
  memory_bytes: int | None = None,
  experiments: int = 1,
) -> None:
  """Checks the batch size against the largest client and the round's memory estimate.

  Args:
    config: a validated config.
    client_counts: int [num_clients] training examples per client.
    model: the flax model (its activations are measured abstractly, nothing runs).
    image_shape: (H, W, C) of one example.
    memory_bytes: memory of the device; default `device_memory_bytes()`.
    experiments: experiments trained side by side in one program (`runner.batch`; with
      --client_chunk_size they run one after another, so they count once).

  Raises:
    ConfigError: naming --batch_size (and --join_ratio for the memory estimate).
  """
  largest = int(np.max(client_counts))
  if config.batch_size > largest:
    raise ConfigError(
      f'--batch_size={config.batch_size} is larger than the largest '
      f'client ({largest} training examples); use at most {largest}'
    )
  cohort = max(1, int(round(config.join_ratio * config.num_clients)))
  # A mesh (--num_devices) gives each device its share of the cohort.
  devices = jax.device_count() if config.num_devices == 0 else config.num_devices
  cohort = -(-cohort // max(1, min(devices, jax.device_count())))
  if config.client_chunk_size:
    cohort = min(cohort, config.client_chunk_size)
  else:
    cohort *= experiments
  needed = (
    cohort
    * config.batch_size
    * activations_per_example(model, image_shape)
    * _TRAIN_BYTES_PER_ACTIVATION
  )
  memory_bytes = memory_bytes or device_memory_bytes()
  if needed > memory_bytes:
    raise ConfigError(
      f'--batch_size={config.batch_size} x {cohort} clients a round per device '
      f'(--join_ratio={config.join_ratio}) needs about {needed / 2**30:.1f} GiB of '
      f'activations, more than the {memory_bytes / 2**30:.1f} GiB of the device; lower '
      '--batch_size or --join_ratio, or train the cohort in chunks (--client_chunk_size)'
    )


def activations_per_example(model: Any, image_shape: tuple[int, ...]) -> int:
  """Values the model's modules output for one example (from shapes only, no compute)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(
    lambda p, x: model.apply(p, x, capture_intermediates=True, mutable=['intermediates']), params, x
  )
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def device_memory_bytes() -> int:
  """Memory of the smallest device of this process: its allocator limit, or the host RAM.

  Only this process's devices are asked (`memory_stats` works only on addressable
  devices); in a multi-process run every process checks its own. Devices without an
  allocator limit (CPU) count the host's RAM shared among them.
  """
  local = jax.local_devices()
  limits = [int((d.memory_stats() or {}).get('bytes_limit', 0)) for d in local]
  if all(limits):
    return min(limits)
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // len(local)
