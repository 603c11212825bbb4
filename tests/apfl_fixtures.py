"""Builders of small FedGen / AP-FL instances for tests (TinyModel, one-hot embeddings)."""

from conftest import TinyModel
import numpy as np
import optax

from apfl_jax.algorithms.apfl import APFL, FriendSetup
from apfl_jax.algorithms.fedgen import FedGen
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.config.config import Config
from apfl_jax.core import local_training


def generator_setup(num_classes=4, global_teacher_weight=0.0):
  config = Config(
    generator='feature',
    noise_dim=8,
    generator_hidden_dim=16,
    generator_steps=5,
    generator_batch_size=16,
    global_teacher_weight=global_teacher_weight,
  )
  dataset = type(
    'D', (), {'image_shape': (6, 6, 1), 'mean': np.array([0.5]), 'std': np.array([0.25])}
  )()
  return knowledge_transfer.create_setup(
    config, TinyModel(num_classes), dataset, np.eye(num_classes, dtype=np.float32)
  )


def schedule_for(data):
  counts = np.asarray(data.train_count)
  return local_training.Schedule.create(8, 1, 0, int(counts.min()), int(counts.max()))


def make_apfl(
  data,
  partition,
  beta=0.1,
  friend_init='local',
  friend_labels='client',
  local_model='persistent',
  global_teacher_weight=0.0,
  client_teachers='local_model',
  samples_per_trained_class=0,
):
  friend = FriendSetup(
    steps=10,
    batch_size=16,
    learning_rate=0.5,
    init=friend_init,
    labels=friend_labels,
    beta=beta,
    samples_per_trained_class=samples_per_trained_class,
  )
  return APFL(
    TinyModel(),
    (6, 6, 1),
    schedule_for(data),
    optax.sgd(0.1),
    optax.sgd(1.0),
    generator_setup(global_teacher_weight=global_teacher_weight),
    friend,
    partition.train_counts,
    seed=0,
    local_model=local_model,
    client_teachers=client_teachers,
  )


def make_fedgen(data, partition, alpha=1.0, regularizer='pfllib', beta=0.0):
  num_classes = partition.train_counts.shape[1]
  return FedGen(
    TinyModel(),
    (6, 6, 1),
    schedule_for(data),
    optax.sgd(0.1),
    optax.sgd(1.0),
    generator_setup(),
    alpha,
    num_classes,
    regularizer,
    beta,
  )
