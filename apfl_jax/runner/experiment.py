"""The experiment of a run: data, partition, model and algorithm, built once; the cohorts.

`build_experiment(config)` loads the data set, partitions it among the clients (seeded),
puts every client's index row on the device and builds the model and the algorithm
behind its client map; `cohort_for_round` picks round r's clients from (seed, r).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from apfl_jax import algorithms, models
from apfl_jax.config import preflight
from apfl_jax.config.config import Config
from apfl_jax.core import cohort as cohort_lib
from apfl_jax.core import local_training, sharding
from apfl_jax.core.errors import ConfigError
from apfl_jax.data import client_data, datasets
from apfl_jax.data import partition as partition_lib

# Test examples per evaluation chunk; test rows are padded to a multiple of it.
EVAL_CHUNK = 256


def cohort_for_round(
  seed: int, round_index: int, num_clients: int, join_ratio: float, dropped: tuple[int, ...] = ()
) -> np.ndarray:
  """The sorted client ids that train in `round_index` (deterministic in seed, round).

  Args:
    seed: the experiment seed.
    round_index: the round (from 1).
    num_clients: clients in the federation.
    join_ratio: fraction of the available clients that train.
    dropped: clients that are gone for this round.

  Returns:
    int32 client ids.
  """
  available = np.setdiff1d(np.arange(num_clients), np.asarray(dropped, np.int64))
  size = max(1, int(round(join_ratio * len(available))))
  if size == len(available):
    return available.astype(np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(available, size, replace=False)).astype(np.int32)


@dataclasses.dataclass
class Experiment:
  """Everything built once before the rounds start."""

  config: Config
  dataset: datasets.Dataset
  partition: partition_lib.Partition
  data: client_data.FederatedData
  model: Any
  algorithm: algorithms.Algorithm
  schedule: local_training.Schedule
  groups: dict[str, np.ndarray]
  dropout_clients: tuple[int, ...]
  unseen_classes: np.ndarray


def build_experiment(config: Config) -> Experiment:
  """Loads data, partitions it and builds the model and the algorithm."""
  dataset = datasets.load_dataset(config.dataset, config.data_dir or None)
  if config.test_split == 'pooled':
    dataset = datasets.pooled(dataset)
  preflight.check_data(config, dataset.train_labels, dataset.num_classes, config.dataset)
  partition = partition_lib.partition_dataset(
    dataset.train_labels,
    dataset.test_labels,
    num_clients=config.num_clients,
    scheme=config.partition,
    seed=config.seed,
    num_classes=dataset.num_classes,
    dirichlet_alpha=config.dirichlet_alpha,
    min_samples=config.min_samples_per_client,
    classes_per_client=config.classes_per_client,
    monopoly_clients=config.monopoly_clients,
    monopoly_classes_per_client=config.monopoly_classes_per_client,
    test_split=config.test_split,
    client_train_fraction=config.client_train_fraction,
  )
  client_map = cohort_lib.ClientMap(
    chunk_size=config.client_chunk_size, mesh=client_mesh(config.num_devices)
  )
  data = sharding.replicate(
    client_data.build_federated_data(dataset, partition, test_multiple=EVAL_CHUNK), client_map.mesh
  )
  counts = np.asarray([len(i) for i in partition.train_indices])
  schedule = local_training.Schedule.create(
    config.batch_size,
    config.local_epochs,
    config.local_steps,
    int(counts.min()),
    int(counts.max()),
    client_counts=tuple(counts.tolist()),
    max_buckets=config.max_client_buckets,
    unroll=config.scan_unroll,
  )
  model = models.create_model(
    config.model, dataset.num_classes, config.conv_impl, config.compute_dtype
  )
  preflight.check_round(config, counts, model, dataset.image_shape)
  algorithm = algorithms.create_algorithm(
    config, model, dataset, partition, schedule
  ).with_client_map(client_map)
  dropout = config.dropout_client_ids(partition.monopoly_clients)
  everyone = np.arange(config.num_clients)
  groups, unseen = {}, np.zeros((0,), np.int64)
  if dropout:
    active = np.setdiff1d(everyone, dropout)
    groups = {'active': active, 'dropout': np.asarray(dropout)}
    unseen = np.setdiff1d(
      partition.classes_held_by(dropout), partition.classes_held_by(active.tolist())
    )
  elif partition.monopoly_clients:
    monopoly = np.asarray(partition.monopoly_clients)
    groups = {'monopoly': monopoly, 'non_monopoly': np.setdiff1d(everyone, monopoly)}
  return Experiment(
    config, dataset, partition, data, model, algorithm, schedule, groups, dropout, unseen
  )


def client_mesh(num_devices: int) -> jax.sharding.Mesh | None:
  """The 'clients' mesh over the first `num_devices` devices (0: all; 1: no mesh).

  Raises:
    ConfigError: naming --num_devices when there are fewer devices.
  """
  devices = jax.devices()
  if num_devices > len(devices):
    raise ConfigError(
      f'--num_devices={num_devices} but JAX sees {len(devices)} {jax.default_backend()} device(s)'
    )
  if jax.process_count() > 1 and num_devices not in (0, len(devices)):
    # Every process runs the same round: the mesh must hold every process's devices.
    raise ConfigError(
      f'--num_devices={num_devices}: a run of {jax.process_count()} processes splits the '
      f'cohort over all {len(devices)} devices of the job; pass --num_devices=0'
    )
  if num_devices == 1 or len(devices) == 1:
    return None
  return sharding.client_mesh(devices[: num_devices or len(devices)])
