"""Shared test fixtures: small synthetic federations (no data set is downloaded)."""

import dataclasses
import os

# The suite's computations are tiny and compiled once each: compile time dominates, and
# XLA's backend optimisation makes it ~1.7x longer (a resume test: 52 s vs 30 s). Both
# sides of every equality test run under the same flags. (Set before jax starts.)
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
)

import chex
import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import optax
import pytest

from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.data import client_data, datasets
from apfl_jax.data import partition as partition_lib
from apfl_jax.studies import results


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session: the many tiny runs that build equal
  computations (each `train_and_evaluate` jits afresh) compile them once. Under
  pytest-xdist the workers share it (the folder above each worker's temporary root)."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    folder = tmp_path_factory.getbasetemp().parent / 'jax_cache'
    folder.mkdir(exist_ok=True)
  else:
    folder = tmp_path_factory.mktemp('jax_cache')
  settings = {
    'jax_compilation_cache_dir': str(folder),
    'jax_persistent_cache_min_compile_time_secs': 0.0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
  }
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  """Pytrees of the same structure whose leaves are allclose (chex)."""
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_trees_equal(actual, expected):
  """Pytrees of the same structure whose leaves are exactly equal (chex)."""
  chex.assert_trees_all_equal(actual, expected)


class TinyModel(nn.Module):
  """A 2-layer MLP with the body/head contract of apfl_jax.models."""

  num_classes: int = 4

  def setup(self):
    self.body = nn.Dense(16)
    self.head = nn.Dense(self.num_classes)

  @property
  def feature_dim(self):
    return 16

  def features(self, x):
    return nn.relu(self.body(x.reshape(x.shape[0], -1)))

  def head_logits(self, h):
    return self.head(h)

  def __call__(self, x):
    return self.head_logits(self.features(x))


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """Just the fields of apfl_jax.data.datasets.Dataset that the library reads."""

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_classes(self):
    return len(self.class_names)

  @property
  def image_shape(self):
    return self.train_images.shape[1:]


def make_synthetic_dataset(num_classes=4, per_class=30, shape=(6, 6, 1), seed=0):
  """Images whose mean brightness pattern depends on the label (learnable)."""
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(0, 256, size=(num_classes, *shape))

  def draw(n):
    labels = np.repeat(np.arange(num_classes), n)
    noise = rng.integers(-40, 40, size=(len(labels), *shape))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int32)

  train_x, train_y = draw(per_class)
  test_x, test_y = draw(per_class // 3)
  return SyntheticDataset(
    'synthetic',
    train_x,
    train_y,
    test_x,
    test_y,
    tuple(f'class{k}' for k in range(num_classes)),
    np.full((shape[-1],), 0.5, np.float32),
    np.full((shape[-1],), 0.25, np.float32),
  )


@pytest.fixture
def float32_matmuls():
  """True float32 matmuls and convolutions while a test runs.

  GPUs run float32 matmuls as TF32 by default (a 10-bit mantissa), which puts
  differences of 1e-2 between backends that agree to 1e-6 in float32; tests that
  compare backends use this so they hold on every platform.
  """
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture
def synthetic_data(monkeypatch):
  """Any data set a run loads is a small synthetic 28x28x1 one with 4 classes."""
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  monkeypatch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)
  return dataset


@pytest.fixture
def synthetic_federation():
  """(dataset, partition, FederatedData) with 4 uneven clients."""
  return make_synthetic_federation()


def make_synthetic_federation():
  """The `synthetic_federation` fixture's value (for module-scoped fixtures)."""
  dataset = make_synthetic_dataset()
  partition = partition_lib.partition_dataset(
    dataset.train_labels,
    dataset.test_labels,
    num_clients=4,
    scheme='dirichlet',
    seed=0,
    num_classes=dataset.num_classes,
    dirichlet_alpha=0.5,
    min_samples=5,
  )
  data = client_data.build_federated_data(dataset, partition, test_multiple=8)
  return dataset, partition, data


def fedavg_reference_round(schedule, data, cohort, seed=0, round_seed=5):
  """One FedAvg round (TinyModel, SGD 0.1, plain averaging) from `key(seed)`'s init.

  Returns:
    (new state, round metrics), the reference that FedAvg-like algorithms reduce to.
  """
  fedavg = FedAvg(TinyModel(), (6, 6, 1), schedule, optax.sgd(0.1), optax.sgd(1.0))
  return jax.jit(fedavg.run_round)(
    fedavg.init(jax.random.key(seed)), cohort, jax.random.key(round_seed), data
  )


def run_two_rounds_compiling_once(algorithm, data):
  """Runs two rounds with different cohorts and asserts the second did not recompile.

  Returns:
    (state, metrics) after the second round.
  """
  run_round = jax.jit(algorithm.run_round)
  state = algorithm.init(jax.random.key(0))
  state, _ = run_round(state, np.array([1, 3], np.int32), jax.random.key(1), data)
  state, metrics = run_round(state, np.array([0, 2], np.int32), jax.random.key(2), data)
  assert run_round._cache_size() == 1
  return state, metrics


def make_run(algorithm, seed, final, best=None, setting='', error='', **extra):
  """A finished run whose summary has `final` (and `best`) personalized accuracies."""
  if error:
    return results.Run(
      algorithm, setting, seed, f'/runs/{algorithm}/seed{seed}', {}, [], error=error
    )
  summary = {
    'final_personalized_acc': final,
    'best_personalized_acc': best or final,
    'best_personalized_acc_round': 2,
    **extra,
  }
  metrics = [
    {'round': 1, 'personalized_acc': final / 2, 'client_personalized_acc': [0.1, None]},
    {'round': 2, 'personalized_acc': final, 'client_personalized_acc': [final, None]},
  ]
  return results.Run(
    algorithm,
    setting,
    seed,
    f'/runs/{algorithm}/seed{seed}',
    summary,
    metrics,
    dropout_clients=(1,),
  )


@pytest.fixture
def runs():
  return [
    make_run('fedavg', 0, 0.5, 0.6, final_global_acc=0.4, best_global_acc=0.45),
    make_run('fedavg', 1, 0.7, 0.8, final_global_acc=0.6, best_global_acc=0.65),
    make_run('local', 0, 0.9, final_global_acc=None),
    make_run('local', 1, 0.0, error='NaN/Inf in training at round 1, client 2'),
  ]
