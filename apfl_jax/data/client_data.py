"""All clients' data as stacked device arrays, indexed from inside jit.

The images of a split are stored once ([N, H, W, C] uint8 on the device); each client's
examples are a row of a padded index matrix [num_clients, max_samples] with a count, so
stacking costs a few ints per example instead of a copy of the images. Padded positions
hold index 0 and are masked wherever they are read.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.data.partition import Partition


@flax.struct.dataclass
class FederatedData:
  """The data of every client, ready for jitted code.

  Attributes:
    train_images: uint8 [N, H, W, C], the whole training split.
    train_labels: int32 [N].
    test_images: uint8 [Nt, H, W, C], the whole test split.
    test_labels: int32 [Nt].
    train_index: int32 [num_clients, max_train], each client's rows of the training split.
    train_count: int32 [num_clients], valid entries per row of `train_index`.
    test_index: int32 [num_clients, max_test], each client's test examples.
    test_count: int32 [num_clients].
    union_test_index: int32 [U], every client's test examples back to back (padded).
    union_test_client: int32 [U], the client of each entry (num_clients for padding).
    mean: float32 [C] per-channel mean of the training pixels in [0, 1].
    std: float32 [C] per-channel standard deviation.
  """

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  train_index: jax.Array
  train_count: jax.Array
  test_index: jax.Array
  test_count: jax.Array
  union_test_index: jax.Array
  union_test_client: jax.Array
  mean: jax.Array
  std: jax.Array

  @property
  def num_clients(self) -> int:
    return self.train_index.shape[0]

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 images -> float32, standardised per channel."""
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std


def _pad_rows(rows: tuple[np.ndarray, ...], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  counts = np.array([len(r) for r in rows], np.int32)
  width = max(int(counts.max()), 1)
  width = -(-width // multiple) * multiple
  index = np.zeros((len(rows), width), np.int32)
  for c, r in enumerate(rows):
    index[c, : len(r)] = r
  return index, counts


def build_federated_data(dataset, partition: Partition, test_multiple: int = 1) -> FederatedData:
  """Moves a data set and its partition onto the default device.

  Args:
    dataset: an `apfl_jax.data.datasets.Dataset`.
    partition: how its examples are split among clients.
    test_multiple: the test index width is padded to a multiple of this (the
      evaluation chunk size).

  Returns:
    The stacked data.
  """
  train_index, train_count = _pad_rows(partition.train_indices)
  test_index, test_count = _pad_rows(partition.test_indices, test_multiple)
  union = np.concatenate(partition.test_indices).astype(np.int32)
  owner = np.repeat(np.arange(len(partition.test_indices)), test_count).astype(np.int32)
  padded = -(-max(len(union), 1) // test_multiple) * test_multiple
  union_index = np.zeros((padded,), np.int32)
  union_index[: len(union)] = union
  union_client = np.full((padded,), len(partition.test_indices), np.int32)
  union_client[: len(union)] = owner
  train_images = jnp.asarray(dataset.train_images)
  train_labels = jnp.asarray(dataset.train_labels, jnp.int32)
  if dataset.test_images is dataset.train_images:  # a pooled data set: one device copy
    test_images, test_labels = train_images, train_labels
  else:
    test_images = jnp.asarray(dataset.test_images)
    test_labels = jnp.asarray(dataset.test_labels, jnp.int32)
  return FederatedData(
    train_images=train_images,
    train_labels=train_labels,
    test_images=test_images,
    test_labels=test_labels,
    train_index=jnp.asarray(train_index),
    train_count=jnp.asarray(train_count),
    test_index=jnp.asarray(test_index),
    test_count=jnp.asarray(test_count),
    union_test_index=jnp.asarray(union_index),
    union_test_client=jnp.asarray(union_client),
    mean=jnp.asarray(dataset.mean, jnp.float32),
    std=jnp.asarray(dataset.std, jnp.float32),
  )
