"""Local training of one client as a pure function, meant to be vmapped over clients.

A client with n examples trains `local_epochs * ceil(n / batch_size)` steps (or exactly
`local_steps` steps); the scan runs the cohort's largest number of steps and masks the
rest, so uneven clients train exactly their own steps and examples and nothing branches
on data. In epoch mode the masked steps can be most of the work (a Dirichlet split gives
some clients several times the mean), so `Schedule.buckets` cuts a cohort, sorted by
size, into a few groups that each scan only as far as their own largest client can need
(see `Algorithm.train_cohort`). Each epoch is a fresh permutation of the client's
examples; the last batch of an epoch may be partial (its missing examples are masked, the
loss is the mean over the valid ones). Shuffles depend only on the client's key and its
count, never on how much padding its row has, so padding cannot change a result.

Structure (as in FedJAX): `client_init` -> `client_step` per batch -> `client_final`.
The scan itself is `run_local_steps`, shared by every algorithm's local loop (APFL-Deng's
joint step and FedRep's phases included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, TypeAlias

import flax.struct
import jax
import jax.numpy as jnp
import optax

from apfl_jax.core import options
from apfl_jax.core.errors import ConfigError

if TYPE_CHECKING:
  from apfl_jax.data.client_data import FederatedData

OPTIMIZERS = ('sgd', 'momentum', 'adam')

Params = Any
# loss_fn(params, images, labels, example_mask, rng) -> scalar loss.
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Static shape of local training (hashable, so it can be a jit constant).

  Attributes:
    batch_size: examples per step.
    local_epochs: epochs per round (0 when `local_steps` is used).
    local_steps: fixed steps per round (0 when `local_epochs` is used).
    num_steps: scan length, the largest number of steps any client takes.
    num_epochs: permutations drawn per client, the most epochs any client needs.
    padded_len: length of a padded permutation, a multiple of `batch_size`.
    client_counts: every client's example count, largest first (for `buckets`).
    max_buckets: the most groups `buckets` may cut a cohort into (1: one lockstep scan).
    unroll: local steps per iteration of the scan's loop (XLA's `scan(unroll=)`;
      fewer loop iterations for latency-bound steps, the same results).
  """

  batch_size: int
  local_epochs: int
  local_steps: int
  num_steps: int
  num_epochs: int
  padded_len: int
  client_counts: tuple[int, ...] = ()
  max_buckets: int = 1
  unroll: int = 1

  @classmethod
  def create(
    cls,
    batch_size: int,
    local_epochs: int,
    local_steps: int,
    min_count: int,
    max_count: int,
    client_counts: tuple[int, ...] = (),
    max_buckets: int = 1,
    unroll: int = 1,
  ) -> 'Schedule':
    """Builds the schedule for clients holding between min_count and max_count examples.

    Args:
      batch_size: examples per step.
      local_epochs: epochs per round (0 with `local_steps`).
      local_steps: fixed steps per round (0 with `local_epochs`).
      min_count: the smallest client's example count.
      max_count: the largest client's example count.
      client_counts: every client's example count (any order), for `buckets`.
      max_buckets: the most groups `buckets` may cut a cohort into.
      unroll: local steps per iteration of the scan's loop.

    Returns:
      The schedule.
    """
    max_batches = math.ceil(max_count / batch_size)
    min_batches = math.ceil(min_count / batch_size)
    if local_steps > 0:
      num_steps, num_epochs = local_steps, math.ceil(local_steps / min_batches)
    else:
      num_steps, num_epochs = local_epochs * max_batches, local_epochs
    return cls(
      batch_size=batch_size,
      local_epochs=local_epochs,
      local_steps=local_steps,
      num_steps=num_steps,
      num_epochs=num_epochs,
      padded_len=max_batches * batch_size,
      client_counts=tuple(sorted((int(c) for c in client_counts), reverse=True)),
      max_buckets=max_buckets,
      unroll=unroll,
    )

  def steps_for(self, count: int) -> int:
    """Scan length a client of `count` examples needs."""
    if self.local_steps > 0:
      return self.local_steps
    return self.local_epochs * math.ceil(count / self.batch_size)

  def with_epochs(self, epochs: int) -> 'Schedule':
    """This schedule run `epochs` times as long (e.g. FedRep's head phase).

    In epoch mode it trains `epochs` epochs of each client's data (the scan and the
    padding of this schedule's clients, so a size group's schedule stays a size group's);
    with `local_steps` it trains `epochs` x `local_steps` steps.
    """
    if self.local_steps > 0:
      return dataclasses.replace(
        self,
        local_steps=epochs * self.local_steps,
        num_steps=epochs * self.num_steps,
        num_epochs=epochs * self.num_epochs,
      )
    return dataclasses.replace(
      self,
      local_epochs=epochs,
      num_steps=epochs * (self.num_steps // self.local_epochs),
      num_epochs=epochs,
    )

  def buckets(self, cohort_size: int) -> tuple[tuple[int, int, 'Schedule'], ...]:
    """Groups of a size-sorted cohort and the schedule each group can scan with.

    Position j of a cohort sorted by example count, largest first, holds at most the
    (j+1)-th largest count of all clients, whichever clients the cohort holds; so the
    group [start, end) never needs more steps than `steps_for(client_counts[start])`.
    The groups minimise the scanned client-steps, sum of (end - start) x steps, over at
    most `max_buckets` groups (fewer when more would not scan fewer steps).

    Args:
      cohort_size: number of clients in the cohort (static).

    Returns:
      ((start, end, schedule), ...) covering range(cohort_size) in order; a single
      (0, cohort_size, self) without client counts, in `local_steps` mode or with
      max_buckets 1.
    """
    if (
      self.max_buckets <= 1
      or self.local_steps > 0
      or len(self.client_counts) < cohort_size
      or cohort_size <= 1
    ):
      return ((0, cohort_size, self),)
    steps = [self.steps_for(c) for c in self.client_counts[:cohort_size]]
    cut_points = _fewest_scanned_steps(steps, self.max_buckets)
    if len(cut_points) == 2:
      return ((0, cohort_size, self),)
    groups = []
    for start, end in zip(cut_points[:-1], cut_points[1:]):
      batches = math.ceil(self.client_counts[start] / self.batch_size)
      groups.append(
        (
          start,
          end,
          dataclasses.replace(
            self,
            num_steps=self.local_epochs * batches,
            padded_len=batches * self.batch_size,
            max_buckets=1,
          ),
        )
      )
    return tuple(groups)

  def fits_buckets(self, counts: Any) -> bool:
    """Whether `buckets(len(counts))` bounds a cohort with these example counts.

    Always true for distinct clients; a cohort repeating a large client (an async
    buffer can hold two arrivals of one client) may exceed a group's step bound.

    Args:
      counts: the cohort's example counts (host values, any order).
    """
    ranked = sorted((int(c) for c in counts), reverse=True)
    return len(self.client_counts) >= len(ranked) and all(
      c <= bound for c, bound in zip(ranked, self.client_counts)
    )


def _fewest_scanned_steps(steps: list[int], max_groups: int) -> list[int]:
  """Cut points [0, ..., len] of non-increasing `steps` minimising sum(size x first)."""
  n = len(steps)
  # best[g][i]: least cost of the first i positions in g groups; cut[g][i]: the last cut.
  inf = float('inf')
  best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
  cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
  best[0][0] = 0
  for g in range(1, max_groups + 1):
    for i in range(1, n + 1):
      for j in range(i):
        cost = best[g - 1][j] + (i - j) * steps[j]
        if cost < best[g][i]:
          best[g][i], cut[g][i] = cost, j
  groups = min(range(1, max_groups + 1), key=lambda g: (best[g][n], g))
  points, i = [n], n
  for g in range(groups, 0, -1):
    i = cut[g][i]
    points.append(i)
  return points[::-1]


def _epoch_permutation(key: jax.Array, count: jax.Array, length: int) -> jax.Array:
  """A permutation of range(count) padded to `length`; independent of `length`."""
  positions = jnp.arange(length)
  sort_keys = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(positions)
  sort_keys = jnp.where(positions < count, sort_keys, 2.0)
  return jnp.argsort(sort_keys, stable=True).astype(jnp.int32)


def batch_plan(key: jax.Array, count: jax.Array, schedule: Schedule):
  """Positions (into the client's index row) of every example of every step.

  Args:
    key: the client's PRNG key for this round.
    count: number of examples the client holds.
    schedule: static schedule.

  Returns:
    (positions int32 [S, B], example_mask float32 [S, B], step_mask bool [S]).
  """
  b = schedule.batch_size
  batches_per_epoch = jnp.maximum((count + b - 1) // b, 1)
  if schedule.local_steps > 0:
    client_steps = jnp.asarray(schedule.local_steps)
  else:
    client_steps = schedule.local_epochs * batches_per_epoch
  epoch_keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(jnp.arange(schedule.num_epochs))
  perms = jax.vmap(lambda k: _epoch_permutation(k, count, schedule.padded_len))(epoch_keys)
  steps = jnp.arange(schedule.num_steps)
  epoch = jnp.minimum(steps // batches_per_epoch, schedule.num_epochs - 1)
  start = (steps % batches_per_epoch) * b
  offsets = start[:, None] + jnp.arange(b)[None, :]
  positions = perms[epoch[:, None], jnp.minimum(offsets, schedule.padded_len - 1)]
  example_mask = (offsets < count).astype(jnp.float32)
  step_mask = steps < client_steps
  return positions, example_mask, step_mask


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the examples where mask is 1."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@flax.struct.dataclass
class ClientTrainState:
  """Carry of the local training scan."""

  params: Params
  opt_state: Any
  loss_sum: jax.Array
  steps: jax.Array


def client_init(params: Params, optimizer: OptimizerLike) -> ClientTrainState:
  """Fresh optimizer state around the starting parameters."""
  return ClientTrainState(
    params=params,
    opt_state=optimizer.init(params),
    loss_sum=jnp.zeros((), jnp.float32),
    steps=jnp.zeros((), jnp.int32),
  )


def client_step(
  state: ClientTrainState,
  images: jax.Array,
  labels: jax.Array,
  example_mask: jax.Array,
  rng: jax.Array,
  loss_fn: LossFn,
  optimizer: OptimizerLike,
) -> ClientTrainState:
  """One optimizer step on one batch."""
  loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels, example_mask, rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return ClientTrainState(
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    loss_sum=state.loss_sum + loss,
    steps=state.steps + 1,
  )


def client_final(state: ClientTrainState) -> tuple[Params, jax.Array]:
  """Trained parameters and the mean training loss over the steps taken."""
  return state.params, state.loss_sum / jnp.maximum(state.steps, 1)


# step_fn(carry, images, labels, example_mask, rng) -> carry: one local step on a batch.
StepFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], Any]


def run_local_steps(
  carry: Any,
  step_fn: StepFn,
  data: FederatedData,
  index_row: jax.Array,
  count: jax.Array,
  rng: jax.Array,
  schedule: Schedule,
) -> Any:
  """The local-step scan every algorithm's local training runs.

  Draws the client's batch plan, gathers and normalises each step's batch from the
  device-resident images, and applies `step_fn`; a padded step (past the client's own
  step count) leaves the carry unchanged. The scan is unrolled `schedule.unroll` times.

  Args:
    carry: the starting carry (any pytree: params, optimizer states, loss sums).
    step_fn: step_fn(carry, normalised images, labels, example_mask, rng) -> carry.
    data: all clients' data.
    index_row: int32 [max_train], the client's row of `data.train_index`.
    count: the client's number of training examples.
    rng: the client's key for this round.
    schedule: static local-training schedule.

  Returns:
    The carry after the client's steps.
  """
  plan_key, step_key = jax.random.split(rng)
  positions, example_mask, step_mask = batch_plan(plan_key, count, schedule)
  step_keys = jax.vmap(lambda s: jax.random.fold_in(step_key, s))(jnp.arange(schedule.num_steps))

  def scan_step(state, xs):
    pos, mask, valid, key = xs
    example_ids = index_row[pos]
    images = data.normalize(data.train_images[example_ids])
    labels = data.train_labels[example_ids]
    new = step_fn(state, images, labels, mask, key)
    return jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, state), None

  carry, _ = jax.lax.scan(
    scan_step, carry, (positions, example_mask, step_mask, step_keys), unroll=schedule.unroll
  )
  return carry


def train_client(
  params: Params,
  loss_fn: LossFn,
  optimizer: OptimizerLike,
  data: FederatedData,
  index_row: jax.Array,
  count: jax.Array,
  rng: jax.Array,
  schedule: Schedule,
) -> tuple[Params, jax.Array]:
  """Trains one client on its own examples (`run_local_steps` of `client_step`).

  Args:
    params: starting parameters.
    loss_fn: loss_fn(params, normalised images, labels, example_mask, rng).
    optimizer: the client optimizer (its state starts fresh).
    data: all clients' data.
    index_row: int32 [max_train], the client's row of `data.train_index`.
    count: the client's number of training examples.
    rng: the client's key for this round.
    schedule: static local-training schedule.

  Returns:
    (trained params, mean training loss).
  """
  step = lambda state, images, labels, mask, key: client_step(
    state, images, labels, mask, key, loss_fn, optimizer
  )
  return client_final(
    run_local_steps(client_init(params, optimizer), step, data, index_row, count, rng, schedule)
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A named optax optimizer, built from its fields where it is used.

  The learning rate is a field rather than a number captured by optax's closures, so
  experiments that differ only in it can share one program: `runner.batch` stacks it and
  puts one experiment's (traced) value into a copy. It quacks like an
  `optax.GradientTransformation` (`init`, `update`); `as_transformation` gives the optax
  object where one is required (`optax.chain`).

  Attributes:
    name: 'sgd', 'momentum' (SGD with momentum 0.9) or 'adam'.
    learning_rate: a number, or a traced scalar inside the experiment axis.
  """

  name: str
  learning_rate: Any

  def transformation(self) -> optax.GradientTransformation:
    if self.name == 'sgd':
      return optax.sgd(self.learning_rate)
    if self.name == 'momentum':
      return optax.sgd(self.learning_rate, momentum=0.9)
    return optax.adam(self.learning_rate)

  def init(self, params: Params) -> Any:
    return self.transformation().init(params)

  def update(self, updates: Any, state: Any, params: Params | None = None) -> tuple[Any, Any]:
    return self.transformation().update(updates, state, params)


# What algorithms take as an optimizer: an `Optimizer`, or an optax transformation built
# around one (FedAsync's proximal term, FedGen's learning-rate decay).
OptimizerLike: TypeAlias = Optimizer | optax.GradientTransformation


def as_transformation(optimizer: OptimizerLike) -> optax.GradientTransformation:
  """The optax transformation of an `Optimizer` (others are returned as they are)."""
  return optimizer.transformation() if isinstance(optimizer, Optimizer) else optimizer


def make_optimizer(name: str, learning_rate: float) -> Optimizer:
  """The named optimizer ('sgd', 'momentum' (0.9) or 'adam').

  Raises:
    ValueError: an unknown name.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}')
  return Optimizer(name, learning_rate)


@dataclasses.dataclass(frozen=True)
class TrainingOptions(options.Options):
  """Each client's local training in a round."""

  TITLE = 'Local training'
  local_epochs: int = options.option(
    1,
    'Local epochs per round (0 to use --local_steps).',
    check=options.non_negative,
  )
  local_steps: int = options.option(
    0,
    'Fixed local steps per round (0 to use --local_epochs).',
    check=options.non_negative,
  )
  max_client_buckets: int = options.option(
    4,
    'Epoch mode: the cohort, sorted by data size, trains in up to N vmapped groups, each '
    'scanning only as many steps as its largest client needs (1: one lockstep scan; the '
    'training is the same up to float rounding).',
    check=options.positive,
  )
  scan_unroll: int = options.option(
    1,
    'Local steps per iteration of the local-training loop (lax.scan unroll; same results, '
    'fewer loop iterations for latency-bound steps).',
    check=options.positive,
  )
  batch_size: int = options.option(
    10,
    'Client batch size.',
    check=options.positive,
  )
  learning_rate: float = options.option(
    0.005,
    'Client learning rate.',
    check=options.positive,
  )
  client_optimizer: str = options.option(
    'sgd',
    'Client optimizer (re-initialised every round).',
    choices=OPTIMIZERS,
  )

  def check(self, config: Any) -> None:
    if (self.local_epochs > 0) == (self.local_steps > 0):
      raise ConfigError(
        'exactly one of --local_epochs and --local_steps must be > 0 '
        f'(got --local_epochs={self.local_epochs}, '
        f'--local_steps={self.local_steps}); set the other to 0'
      )
