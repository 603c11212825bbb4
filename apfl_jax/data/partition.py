"""Seeded, deterministic splits of a labelled data set among federated clients.

Four schemes (`--partition`):
  * iid: a uniform random split.
  * dirichlet: per class, client shares drawn from Dirichlet(alpha); redrawn until every
    client holds at least `min_samples` examples (the PFLlib procedure, including its
    cap that stops giving a class to clients already above the average size).
  * pathological: each client holds `classes_per_client` classes; each class is split
    evenly among the clients holding it.
  * monopoly: the last `monopoly_clients` clients each own `monopoly_classes_per_client`
    classes that no other client holds (the AP-FL dropout scenario); the other clients
    split the remaining classes pathologically.

Two ways to give clients test data (`--test_split`):
  * proportional: each client's test split follows its own label mix: the test examples of
    class k are shared among the clients in proportion to their training counts of class k,
    so each test example belongs to at most one client and the union of the client test
    splits is the test set of the classes that some client holds.
  * pooled (PFLlib): the caller pools the train and test splits into one set (see
    `datasets.pooled`), the scheme splits the pool among clients, and each client's share
    is shuffled and cut into `client_train_fraction` training and the rest test examples.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from apfl_jax.core.errors import ConfigError

PARTITIONS = ('iid', 'dirichlet', 'pathological', 'monopoly')
TEST_SPLITS = ('proportional', 'pooled')
_MAX_DIRICHLET_DRAWS = 1000


@dataclasses.dataclass(frozen=True)
class Partition:
  """Client index lists into the train and test splits.

  Attributes:
    train_indices: per client, int64 indices into the training split (sorted).
    test_indices: per client, int64 indices into the test split (sorted).
    num_classes: number of classes of the data set.
    train_counts: int64 [num_clients, num_classes] training examples per client and class.
    test_counts: int64 [num_clients, num_classes] test examples per client and class.
    monopoly_clients: clients that own classes no other client holds (empty if none).
    monopoly_classes: the classes those clients own.
  """

  train_indices: tuple[np.ndarray, ...]
  test_indices: tuple[np.ndarray, ...]
  num_classes: int
  train_counts: np.ndarray
  test_counts: np.ndarray
  monopoly_clients: tuple[int, ...] = ()
  monopoly_classes: tuple[int, ...] = ()

  @property
  def num_clients(self) -> int:
    return len(self.train_indices)

  def classes_held_by(self, clients: list[int] | tuple[int, ...]) -> np.ndarray:
    """Classes with at least one training example among `clients`."""
    if not len(clients):
      return np.zeros((0,), np.int64)
    return np.flatnonzero(self.train_counts[list(clients)].sum(0) > 0)

  def table(self) -> str:
    """A plain-text table of training (and test) counts per client and class."""
    header = 'client ' + ' '.join(f'{k:>5d}' for k in range(self.num_classes)) + '  train  test'
    lines = [header]
    for c in range(self.num_clients):
      mark = '*' if c in self.monopoly_clients else ' '
      row = ' '.join(f'{n:>5d}' for n in self.train_counts[c])
      lines.append(
        f'{c:>5d}{mark} {row}  {self.train_counts[c].sum():>5d} {self.test_counts[c].sum():>5d}'
      )
    if self.monopoly_clients:
      lines.append(
        f'* monopoly clients {list(self.monopoly_clients)} own classes '
        f'{list(self.monopoly_classes)}'
      )
    return '\n'.join(lines)

  def to_json(self) -> str:
    return json.dumps(
      {
        'num_clients': self.num_clients,
        'num_classes': self.num_classes,
        'train_counts': self.train_counts.tolist(),
        'test_counts': self.test_counts.tolist(),
        'monopoly_clients': list(self.monopoly_clients),
        'monopoly_classes': list(self.monopoly_classes),
      }
    )


def partition_dataset(
  train_labels: np.ndarray,
  test_labels: np.ndarray,
  *,
  num_clients: int,
  scheme: str,
  seed: int,
  num_classes: int,
  dirichlet_alpha: float = 0.1,
  min_samples: int = 10,
  classes_per_client: int = 2,
  monopoly_clients: int = 1,
  monopoly_classes_per_client: int = 2,
  test_split: str = 'proportional',
  client_train_fraction: float = 0.75,
) -> Partition:
  """Splits a data set among clients.

  Args:
    train_labels: int [N] training labels (with test_split 'pooled': the pool's labels).
    test_labels: int [Nt] test labels (with test_split 'pooled': the pool's labels again;
      train and test indices then both index the pool).
    num_clients: number of clients.
    scheme: 'iid', 'dirichlet', 'pathological' or 'monopoly'.
    seed: seed of every random draw here.
    num_classes: number of classes.
    dirichlet_alpha: Dirichlet concentration (scheme 'dirichlet').
    min_samples: minimum training examples per client (scheme 'dirichlet').
    classes_per_client: classes per client ('pathological'; non-monopoly clients of
      'monopoly').
    monopoly_clients: number of monopoly clients (the last ones).
    monopoly_classes_per_client: classes each monopoly client owns.
    test_split: 'proportional' or 'pooled' (see the module docstring).
    client_train_fraction: with 'pooled', the training share of each client's examples.

  Returns:
    The partition.

  Raises:
    ConfigError: when the requested split is impossible, naming the flag.
  """
  rng = np.random.default_rng(seed)
  train_labels = np.asarray(train_labels)
  monopoly_client_ids: tuple[int, ...] = ()
  monopoly_class_ids: tuple[int, ...] = ()
  train_indices: list[Any]
  if scheme == 'iid':
    order = rng.permutation(len(train_labels))
    train_indices = np.array_split(order, num_clients)
  elif scheme == 'dirichlet':
    train_indices = _dirichlet(
      train_labels, num_clients, num_classes, dirichlet_alpha, min_samples, rng
    )
  elif scheme == 'pathological':
    train_indices = _pathological(
      train_labels, list(range(num_clients)), rng.permutation(num_classes), classes_per_client, rng
    )
  elif scheme == 'monopoly':
    if monopoly_clients >= num_clients:
      raise ConfigError(
        f'--monopoly_clients={monopoly_clients} must be smaller than --num_clients={num_clients}'
      )
    owned = monopoly_clients * monopoly_classes_per_client
    if owned >= num_classes:
      raise ConfigError(
        f'--monopoly_clients x --monopoly_classes_per_client = {owned} must leave at '
        f'least one of the {num_classes} classes for the other clients'
      )
    class_order = rng.permutation(num_classes)
    shared_classes, monopoly_class_ids = (
      class_order[owned:],
      tuple(sorted(int(k) for k in class_order[:owned])),
    )
    others = list(range(num_clients - monopoly_clients))
    monopoly_client_ids = tuple(range(num_clients - monopoly_clients, num_clients))
    train_indices = [None] * num_clients
    for c, idx in zip(
      others,
      _pathological(
        train_labels, others, shared_classes, min(classes_per_client, len(shared_classes)), rng
      ),
    ):
      train_indices[c] = idx
    owned_order = class_order[:owned]
    for j, c in enumerate(monopoly_client_ids):
      mine = owned_order[j * monopoly_classes_per_client : (j + 1) * monopoly_classes_per_client]
      train_indices[c] = np.flatnonzero(np.isin(train_labels, mine))
  else:
    raise ConfigError(f'--partition: unknown value {scheme!r}')

  if test_split == 'pooled':
    if len(test_labels) != len(train_labels):
      raise ValueError(
        'test_split pooled: train_labels and test_labels must both be the '
        f'pool, got {len(train_labels)} and {len(test_labels)} labels'
      )
    train_indices, pooled_test = _cut_each_client(train_indices, client_train_fraction, rng)
  elif test_split != 'proportional':
    raise ConfigError(f'--test_split: unknown value {test_split!r}')
  sorted_indices = tuple(np.sort(np.asarray(i, np.int64)) for i in train_indices)
  for c, idx in enumerate(sorted_indices):
    if len(idx) == 0:
      raise ConfigError(
        f'--num_clients={num_clients} is too many for --partition={scheme}: '
        f'client {c} gets no training data'
      )
  train_counts = np.stack(
    [np.bincount(train_labels[i], minlength=num_classes) for i in sorted_indices]
  ).astype(np.int64)
  if test_split == 'pooled':
    test_indices = tuple(np.sort(i) for i in pooled_test)
  else:
    test_indices = _proportional_test_split(np.asarray(test_labels), train_counts, rng)
  test_counts = np.stack(
    [np.bincount(np.asarray(test_labels)[i], minlength=num_classes) for i in test_indices]
  ).astype(np.int64)
  return Partition(
    train_indices=sorted_indices,
    test_indices=test_indices,
    num_classes=num_classes,
    train_counts=train_counts,
    test_counts=test_counts,
    monopoly_clients=monopoly_client_ids,
    monopoly_classes=monopoly_class_ids,
  )


def _dirichlet(
  labels: np.ndarray,
  num_clients: int,
  num_classes: int,
  alpha: float,
  min_samples: int,
  rng: np.random.Generator,
) -> list[np.ndarray]:
  """Per-class Dirichlet split, redrawn until every client has `min_samples`."""
  n = len(labels)
  for _ in range(_MAX_DIRICHLET_DRAWS):
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for k in range(num_classes):
      idx_k = rng.permutation(np.flatnonzero(labels == k))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      shares = shares * (sizes < n / num_clients)
      shares = shares / shares.sum()
      cuts = (np.cumsum(shares) * len(idx_k)).astype(np.int64)[:-1]
      for c, part in enumerate(np.split(idx_k, cuts)):
        shards[c].append(part)
        sizes[c] += len(part)
    if sizes.min() >= min_samples:
      return [np.concatenate(s) for s in shards]
  raise ConfigError(
    f'--min_samples_per_client={min_samples} was not reached in {_MAX_DIRICHLET_DRAWS} '
    f'Dirichlet draws with --dirichlet_alpha={alpha} and --num_clients={num_clients}; '
    'lower it or use fewer clients'
  )


def _pathological(
  labels: np.ndarray,
  clients: list[int],
  classes: np.ndarray,
  classes_per_client: int,
  rng: np.random.Generator,
) -> list[np.ndarray]:
  """Gives each client `classes_per_client` of `classes` round-robin, split evenly."""
  holders: dict[int, list[int]] = {int(k): [] for k in classes}
  for i, _ in enumerate(clients):
    for j in range(classes_per_client):
      holders[int(classes[(i * classes_per_client + j) % len(classes)])].append(i)
  shards: list[list[np.ndarray]] = [[] for _ in clients]
  for k, holding in holders.items():
    if not holding:
      continue
    idx_k = rng.permutation(np.flatnonzero(labels == k))
    for i, part in zip(holding, np.array_split(idx_k, len(holding))):
      shards[i].append(part)
  return [np.concatenate(s) if s else np.zeros((0,), np.int64) for s in shards]


def _cut_each_client(
  indices: list[np.ndarray], train_fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Shuffles each client's examples and cuts floor(fraction * n) off for training."""
  train, test = [], []
  for c, idx in enumerate(indices):
    shuffled = rng.permutation(np.asarray(idx, np.int64))
    cut = int(np.floor(train_fraction * len(shuffled)))
    if cut == 0:
      raise ConfigError(
        f'--client_train_fraction={train_fraction} leaves client {c} (with '
        f'{len(shuffled)} examples) no training example'
      )
    train.append(shuffled[:cut])
    test.append(shuffled[cut:].astype(np.int64))
  return train, test


def _proportional_test_split(
  test_labels: np.ndarray, train_counts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
  """Shares each class's test examples in proportion to the clients' train counts."""
  num_clients, num_classes = train_counts.shape
  shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for k in range(num_classes):
    holders = train_counts[:, k]
    if holders.sum() == 0:
      continue
    idx_k = rng.permutation(np.flatnonzero(test_labels == k))
    exact = holders / holders.sum() * len(idx_k)
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind='stable')
    quota[remainder_order[: len(idx_k) - quota.sum()]] += 1
    for c, part in enumerate(np.split(idx_k, np.cumsum(quota)[:-1])):
      shards[c].append(part)
  return tuple(np.sort(np.concatenate(s)) if s else np.zeros((0,), np.int64) for s in shards)
