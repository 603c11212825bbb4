"""The evaluation interface: device counts inside one jitted call, host metrics after."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from apfl_jax.core import evaluation
from apfl_jax.runner.experiment import EVAL_CHUNK, Experiment


@dataclasses.dataclass(frozen=True)
class EvalInputs:
  """What every evaluation's device function sees inside the one jitted evaluation call.

  Attributes:
    experiment: the run (static: algorithm, model).
    data: the clients' device data.
    unseen_index: int [U'] test-pool rows of the classes no training client held, padded
      to a multiple of EVAL_CHUNK.
    unseen_group: int [U'] 0 on those rows, 1 on the padding.
    num_unseen: how many of those rows are real (static).
    dropout_ids: int [D] the dropout clients.
  """

  experiment: Experiment
  data: Any
  unseen_index: jax.Array
  unseen_group: jax.Array
  num_unseen: int
  dropout_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One named evaluation: counts on the device, metrics on the host.

  Attributes:
    counts: (inputs, algorithm state, the counts of the evaluations before it) -> correct
      counts, traced inside the one jitted evaluation call; None where the evaluation
      does not apply (no global model, ...).
    metrics: (inputs, counts or None, the metrics of the evaluations before it) -> the
      metrics it adds to metrics.jsonl, on the host.
  """

  counts: Callable[[EvalInputs, Any, dict[str, Any]], Any]
  metrics: Callable[[EvalInputs, Any, dict[str, Any]], dict[str, Any]]


def pool_counts(inputs: EvalInputs, params: Any) -> jax.Array:
  """Correct counts per client of one model on the union test pool."""
  data = inputs.data
  return evaluation.correct_by_group(
    inputs.experiment.model,
    params,
    data,
    data.union_test_index,
    data.union_test_client,
    data.num_clients,
    EVAL_CHUNK,
  )
