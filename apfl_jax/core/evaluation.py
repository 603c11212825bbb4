"""Evaluation: every client's model on its own test split, through the client map.

Accuracy is counted per client (correct, total) in fixed-size chunks of its padded test
index row, so memory stays bounded and padded entries are masked. The global model is
evaluated on the union of the client test splits by broadcasting it over the clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from apfl_jax.core.cohort import ClientMap

if TYPE_CHECKING:
  from apfl_jax.data.client_data import FederatedData


def correct_by_group(
  model: Any,
  params: Any,
  data: FederatedData,
  index: jax.Array,
  group: jax.Array,
  num_groups: int,
  chunk: int,
) -> jax.Array:
  """Correct predictions of ONE model on test examples, summed per group.

  Args:
    model: the Flax model.
    params: its parameters.
    data: all clients' data.
    index: int32 [U] test-split indices, U a multiple of `chunk`.
    group: int32 [U] group of each entry in [0, num_groups); num_groups marks padding.
    num_groups: number of groups.
    chunk: examples evaluated at once.

  Returns:
    int32 [num_groups] correct predictions per group.
  """

  def body(correct, xs):
    ids, groups = xs
    logits = model.apply({'params': params}, data.normalize(data.test_images[ids]))
    hit = (jnp.argmax(logits, -1) == data.test_labels[ids]).astype(jnp.int32)
    return correct.at[groups].add(hit, mode='drop'), None

  correct, _ = jax.lax.scan(
    body, jnp.zeros((num_groups,), jnp.int32), (index.reshape(-1, chunk), group.reshape(-1, chunk))
  )
  return correct


def client_correct_counts(
  model: Any,
  params: Any,
  data: FederatedData,
  chunk: int,
  client_ids: jax.Array | None = None,
  client_map: ClientMap = ClientMap(),
) -> jax.Array:
  """Correct predictions per client of each client's own model.

  Args:
    model: the Flax model.
    params: parameters stacked per client (leading axis num_clients, or the length
      of `client_ids`).
    data: all clients' data; data.test_index width must be a multiple of `chunk`.
    chunk: examples evaluated at once per client.
    client_ids: optional int [N]: score only these clients (params stacked like them).
    client_map: how the clients are mapped (vmap, chunks of clients, a mesh).

  Returns:
    int32 [num_clients] (or [N]) correct predictions (data.test_count holds the totals).
  """
  num_chunks = data.test_index.shape[1] // chunk

  def one_client(p, row, count):
    def body(correct, i):
      positions = i * chunk + jnp.arange(chunk)
      ids = row[positions]
      logits = model.apply({'params': p}, data.normalize(data.test_images[ids]))
      hit = (jnp.argmax(logits, -1) == data.test_labels[ids]) & (positions < count)
      return correct + jnp.sum(hit, dtype=jnp.int32), None

    correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), jnp.arange(num_chunks))
    return correct

  rows, counts = data.test_index, data.test_count
  if client_ids is not None:
    rows, counts = rows[client_ids], counts[client_ids]
  return client_map(one_client, (0, 0, 0), params, rows, counts)


def accuracy_summary(
  correct: np.ndarray, count: np.ndarray, groups: dict[str, np.ndarray], prefix: str
) -> dict[str, float]:
  """Mean-over-clients and sample-weighted accuracy, overall and per client group.

  Clients with no test examples are left out of the means.

  Args:
    correct: int [num_clients] correct predictions.
    count: int [num_clients] test examples.
    groups: name -> client ids, reported as '<name>_<prefix>_acc'.
    prefix: metric name stem, e.g. 'personalized'.

  Returns:
    '<prefix>_acc' (mean over clients), '<prefix>_acc_weighted', and per group
    '<group>_<prefix>_acc'.
  """
  correct, count = np.asarray(correct, np.float64), np.asarray(count, np.float64)

  def mean_acc(ids):
    ids = np.asarray(ids, np.int64)
    ids = ids[count[ids] > 0]
    return float(np.mean(correct[ids] / count[ids])) if len(ids) else float('nan')

  everyone = np.arange(len(count))
  out = {
    f'{prefix}_acc': mean_acc(everyone),
    f'{prefix}_acc_weighted': float(correct.sum() / max(count.sum(), 1.0)),
  }
  for name, ids in groups.items():
    out[f'{name}_{prefix}_acc'] = mean_acc(ids)
  return out
