"""Tests of apfl_jax.data.partition."""

import numpy as np
import pytest

from apfl_jax.core.errors import ConfigError
from apfl_jax.data import partition as partition_lib

NUM_CLASSES = 10
TRAIN = np.repeat(np.arange(NUM_CLASSES), 100)
TEST = np.repeat(np.arange(NUM_CLASSES), 20)


def split(scheme, seed=0, num_clients=10, **kw):
  return partition_lib.partition_dataset(
    TRAIN, TEST, num_clients=num_clients, scheme=scheme, seed=seed, num_classes=NUM_CLASSES, **kw
  )


def assert_disjoint_cover(indices, total):
  joined = np.concatenate(indices)
  assert len(np.unique(joined)) == len(joined)
  assert len(joined) <= total


@pytest.mark.parametrize('scheme', ['iid', 'dirichlet', 'pathological', 'monopoly'])
def test_train_and_test_splits_are_disjoint(scheme):
  p = split(scheme)
  assert_disjoint_cover(p.train_indices, len(TRAIN))
  assert_disjoint_cover(p.test_indices, len(TEST))
  np.testing.assert_array_equal(p.train_counts.sum(1), [len(i) for i in p.train_indices])


def test_iid_uses_every_example():
  p = split('iid')
  assert sum(len(i) for i in p.train_indices) == len(TRAIN)
  assert sum(len(i) for i in p.test_indices) == len(TEST)


def test_dirichlet_is_reproducible_and_seed_dependent():
  a, b, c = split('dirichlet', seed=3), split('dirichlet', seed=3), split('dirichlet', seed=4)
  for x, y in zip(a.train_indices, b.train_indices):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.train_counts, c.train_counts)


def test_dirichlet_respects_min_samples_and_is_skewed():
  p = split('dirichlet', dirichlet_alpha=0.1, min_samples=30)
  assert p.train_counts.sum(1).min() >= 30
  # With alpha=0.1 most clients are dominated by few classes.
  top_share = p.train_counts.max(1) / p.train_counts.sum(1)
  assert np.median(top_share) > 0.4


def test_dirichlet_unreachable_min_samples_names_the_flag():
  with pytest.raises(ConfigError, match='--min_samples_per_client'):
    split('dirichlet', min_samples=1000)


def test_pathological_gives_k_classes_per_client():
  p = split('pathological', classes_per_client=3)
  np.testing.assert_array_equal((p.train_counts > 0).sum(1), 3)


def test_monopoly_classes_are_held_by_nobody_else():
  p = split('monopoly', monopoly_clients=2, monopoly_classes_per_client=2, classes_per_client=2)
  assert p.monopoly_clients == (8, 9)
  assert len(p.monopoly_classes) == 4
  others = [c for c in range(10) if c not in p.monopoly_clients]
  held_by_others = set(p.classes_held_by(others).tolist())
  assert held_by_others.isdisjoint(p.monopoly_classes)
  held_by_monopoly = set(p.classes_held_by(p.monopoly_clients).tolist())
  assert held_by_monopoly == set(p.monopoly_classes)
  for c in p.monopoly_clients:
    assert (p.train_counts[c] > 0).sum() == 2


def test_monopoly_must_leave_classes_for_others():
  with pytest.raises(ConfigError, match='--monopoly_clients'):
    split('monopoly', monopoly_clients=5, monopoly_classes_per_client=2)


@pytest.mark.parametrize('scheme', ['dirichlet', 'pathological', 'monopoly'])
def test_test_split_follows_client_label_mix(scheme):
  p = split(scheme)
  # A client is tested only on classes it trains on, roughly in the same proportion.
  assert np.all(p.test_counts[p.train_counts == 0] == 0)
  train_mix = p.train_counts / p.train_counts.sum(1, keepdims=True)
  test_mix = p.test_counts / np.maximum(p.test_counts.sum(1, keepdims=True), 1)
  big = p.test_counts.sum(1) >= 20
  assert np.abs(train_mix[big] - test_mix[big]).max() < 0.15


def test_table_lists_every_client():
  p = split('monopoly')
  table = p.table()
  assert len(table.splitlines()) == 1 + 10 + 1
  assert 'monopoly clients [9]' in table


POOL = np.concatenate([TRAIN, TEST])


@pytest.mark.parametrize('scheme', ['dirichlet', 'pathological'])
def test_pooled_split_cuts_each_client_share_into_train_and_test(scheme):
  p = partition_lib.partition_dataset(
    POOL,
    POOL,
    num_clients=10,
    scheme=scheme,
    seed=0,
    num_classes=NUM_CLASSES,
    test_split='pooled',
    client_train_fraction=0.75,
  )
  assert_disjoint_cover(p.train_indices + p.test_indices, len(POOL))
  for train, test in zip(p.train_indices, p.test_indices):
    share = len(train) + len(test)
    assert len(train) == int(np.floor(0.75 * share))
    if scheme == 'pathological':  # test examples come from the client's own 2 classes
      assert len(set(POOL[train]) | set(POOL[test])) == 2
  # Every pooled example (test ones included) goes to some client under pathological.
  if scheme == 'pathological':
    assert sum(len(a) + len(b) for a, b in zip(p.train_indices, p.test_indices)) == len(POOL)
  # Each client's share (train + test) is exactly what the scheme alone gives it.
  scheme_only = partition_lib.partition_dataset(
    POOL, POOL[:10], num_clients=10, scheme=scheme, seed=0, num_classes=NUM_CLASSES
  )
  for train, test, share in zip(p.train_indices, p.test_indices, scheme_only.train_indices):
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), share)


def test_pooled_split_is_reproducible_and_differs_from_proportional():
  kw = dict(num_clients=10, scheme='dirichlet', seed=3, num_classes=NUM_CLASSES)
  a = partition_lib.partition_dataset(POOL, POOL, test_split='pooled', **kw)
  b = partition_lib.partition_dataset(POOL, POOL, test_split='pooled', **kw)
  for x, y in zip(a.train_indices + a.test_indices, b.train_indices + b.test_indices):
    np.testing.assert_array_equal(x, y)
  # The pool's test half (indices >= len(TRAIN)) is used for training too.
  assert max(int(i.max()) for i in a.train_indices) >= len(TRAIN)


def test_pooled_split_that_leaves_a_client_no_training_example_names_the_flag():
  with pytest.raises(ConfigError, match='--client_train_fraction'):
    partition_lib.partition_dataset(
      POOL,
      POOL,
      num_clients=10,
      scheme='iid',
      seed=0,
      num_classes=NUM_CLASSES,
      test_split='pooled',
      client_train_fraction=0.005,
    )
