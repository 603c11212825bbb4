"""Federated algorithms, one file each, behind `apfl_jax.algorithms.base.Algorithm`."""

from __future__ import annotations

import dataclasses
from typing import Any

from apfl_jax import embeddings
from apfl_jax import local_training
from apfl_jax.algorithms import knowledge_transfer
from apfl_jax.algorithms.apfl import APFL, FriendSetup
from apfl_jax.algorithms.apfl_deng import APFLDeng
from apfl_jax.algorithms.base import Algorithm
from apfl_jax.algorithms.ditto import Ditto
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.fedavg_ft import FedAvgFT
from apfl_jax.algorithms.fedgen import FedGen, generator_optimizer
from apfl_jax.algorithms.fedprox import FedProx
from apfl_jax.algorithms.fedrep import FedRep
from apfl_jax.algorithms.local import LocalOnly
from apfl_jax.config import Config
from apfl_jax.errors import ConfigError

# Baselines built by their own `from_config`.
BASELINES = {'fedprox': FedProx, 'ditto': Ditto, 'fedrep': FedRep, 'apfl_deng': APFLDeng,
             'fedavg_ft': FedAvgFT}


def create_algorithm(config: Config, model: Any, dataset: Any, partition: Any,
                     schedule: local_training.Schedule) -> Algorithm:
  """The algorithm named by --algorithm, built from the config.

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
  client_optimizer = local_training.make_optimizer(config.client_optimizer,
                                                   config.learning_rate)
  server_optimizer = local_training.make_optimizer(config.server_optimizer,
                                                   config.server_learning_rate)
  image_shape = dataset.image_shape
  if config.algorithm == 'fedavg':
    return FedAvg(model, image_shape, schedule, client_optimizer, server_optimizer)
  if config.algorithm == 'local':
    return LocalOnly(model, image_shape, schedule, client_optimizer, config.num_clients)
  if config.algorithm in BASELINES:
    return BASELINES[config.algorithm].from_config(config, model, dataset, partition, schedule,
                                                   client_optimizer, server_optimizer)
  table = embeddings.class_embeddings(
      dataset.class_names, config.embedding,
      config.embedding_template, model_name=config.embedding_model or None)
  setup = knowledge_transfer.create_setup(config, model, dataset, table)
  if config.algorithm == 'fedgen':
    if config.generator != 'feature':
      raise ConfigError('--generator=image is not FedGen: --algorithm=fedgen needs '
                        '--generator=feature')
    setup = dataclasses.replace(setup, optimizer=generator_optimizer(
        config.generator_learning_rate, config.fedgen_generator_weight_decay,
        config.fedgen_generator_lr_decay, config.generator_steps))
    return FedGen(model, image_shape, schedule, client_optimizer, server_optimizer, setup,
                  config.fedgen_alpha, dataset.num_classes, config.fedgen_regularizer, config.fedgen_beta)
  if config.algorithm == 'apfl':
    return APFL(model, image_shape, schedule, client_optimizer, server_optimizer, setup,
                FriendSetup.from_config(config, dataset.num_classes),
                partition.train_counts, config.seed, config.apfl_local_model)
  raise ValueError(f'unknown algorithm {config.algorithm!r}')
