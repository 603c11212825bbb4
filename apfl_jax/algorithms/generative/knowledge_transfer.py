"""Server-side data-free knowledge transfer, shared by FedGen and AP-FL.

The teachers are the round's client models and the (new) global model. The server
rebuilds the client models from what they sent (start params + their update), or takes
the models they sent (AP-FL's local models, `--apfl_client_teachers`), evaluates
every teacher on a generated batch in one vmap, and trains the generator G(z, A(y)) on

  L_G = lambda * sum_k w_{k,y} CE(teacher_k(G(z, A(y))), y) + (1 - lambda) * L_div.

The server's memory is a running count of every label it has learned from (`seen_counts`,
summed over all rounds and arrivals), so the generator keeps being trained on every class
seen so far, not only on the labels of the last cohort or buffer:

  * labels y are drawn uniformly from the memorized classes (seen_counts > 0);
  * a label some client of this round holds is taught by those clients with
    w_{k,y} = (1 - g) n_{k,y} / sum_j n_{j,y} and by the global model with g
    (g = `global_teacher_weight`);
  * a memorized label no client of this round holds is taught by the global model alone.

With g = 1 (AP-FL's default: "data-free knowledge transfer under global model
supervision") only the global model teaches and the client models are not rebuilt.
The global teacher is the model the server holds after this step's aggregation (sync and
FedBuff: the new global model; FedAsync: the mixture (1 - a) x + a x_client, through
`asynchrony.simulator.fedasync_mixing`).
A class nobody ever held is never drawn: it is reached only through its embedding
A(c) (zero-shot).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import base
from apfl_jax.algorithms.generative import embeddings
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.core import options
from apfl_jax.core.errors import ConfigError


def _teacher_weight(name: str, value: float) -> None:
  if not (0.0 <= value <= 1.0 or value == -1.0):
    raise ConfigError(f"--{name} must be in [0, 1] (or -1: the algorithm's default), got {value}")


@dataclasses.dataclass(frozen=True)
class GeneratorOptions(options.Options):
  """The server-side generator's flags (FedGen, AP-FL).

  '' (and -1 for --global_teacher_weight) mean the algorithm's default
  (`registry.register(..., defaults=...)`); for an algorithm without one, a feature
  generator taught by the round's clients.
  """

  TITLE = 'Generator (FedGen, AP-FL)'
  embedding: str = options.option(
    '',
    'Class-name embedding A(c) of the generator: minilm (offline), clip (needs the hub) or '
    "onehot; empty = the algorithm's default (apfl: minilm, fedgen: onehot).",
    choices=embeddings.EMBEDDINGS,
  )
  embedding_template: str = options.option(
    '{}', 'Text template of a class name, with one {} for the name.'
  )
  embedding_model: str = options.option(
    '', 'Hugging Face id or folder of the CLIP model (--embedding=clip).'
  )
  generator: str = options.option(
    '',
    "Generator output: feature (the head's input, FedGen) or image (DCGAN); empty = the "
    "algorithm's default (apfl: image, fedgen: feature).",
    choices=generator_lib.GENERATORS,
  )
  noise_dim: int = options.option(32, 'Width of the generator noise z.', check=options.positive)
  noise_distribution: str = options.option(
    'uniform',
    'Distribution of z: uniform U[0,1) (FedGen) or normal.',
    choices=generator_lib.NOISE_DISTRIBUTIONS,
  )
  generator_hidden_dim: int = options.option(
    256, 'Hidden width of the feature generator.', check=options.positive
  )
  generator_steps: int = options.option(
    50, 'Generator optimizer steps per round on the server.', check=options.positive
  )
  generator_batch_size: int = options.option(
    64, 'Generated samples per generator step.', check=options.positive
  )
  generator_learning_rate: float = options.option(
    3e-4, 'Adam learning rate of the generator.', check=options.positive
  )
  generator_ce_weight: float = options.option(
    0.5, 'lambda in L_G = lambda*L_CE + (1-lambda)*L_div.', check=options.unit_interval
  )
  diversity_pairs: str = options.option(
    'all',
    "Pairs of generated samples L_div spreads apart: all (FedGen's code) or same_label "
    '(a class cannot collapse to one sample whatever z is).',
    choices=generator_lib.DIVERSITY_PAIRS,
  )
  global_teacher_weight: float = options.option(
    -1.0,
    "g: share of each label's teacher weight given to the global model (the rest goes to "
    "the round's clients holding the label; memorized labels nobody holds this round: the "
    "global model alone); -1 = the algorithm's default (apfl: 1, fedgen: 0).",
    check=_teacher_weight,
  )

  def resolve(self, config: Any) -> dict[str, Any]:
    del config
    changes: dict[str, Any] = {}
    if not self.generator:
      changes['generator'] = 'feature'
    if self.global_teacher_weight < 0:
      changes['global_teacher_weight'] = 0.0
    return changes


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratorSetup:
  """The generator and the static settings of its training.

  Attributes:
    generator: a FeatureGenerator or ImageGenerator.
    optimizer: its optax optimizer (Adam).
    kind: 'feature' (samples are head inputs) or 'image' (samples are images).
    noise_dim: width of z.
    noise_distribution: 'uniform' or 'normal'.
    steps: optimizer steps per round.
    batch_size: samples per step.
    ce_weight: lambda.
    diversity_pairs: 'all' or 'same_label', the pairs L_div spreads apart.
    global_teacher_weight: g, the share of each label's teacher weight given to the
      global model (1: the global model is the only teacher).
    ce_weighting: how the teacher CE weighs a sample (`generator.teacher_cross_entropy`):
      'per_sample' or FedGen's code's 'official'.
    label_count_prior: added to every round client's count of each label some client
      holds, in the client teachers' weights (FedGen's code: 1; the memory is unchanged).
  """

  generator: nn.Module
  optimizer: optax.GradientTransformation
  kind: str
  noise_dim: int
  noise_distribution: str
  steps: int
  batch_size: int
  ce_weight: float
  diversity_pairs: str
  global_teacher_weight: float
  ce_weighting: str = 'per_sample'
  label_count_prior: float = 0.0


def create_setup(
  config: Any,
  model: nn.Module,
  dataset: Any,
  embedding_table: np.ndarray,
  kind: str | None = None,
  global_teacher_weight: float | None = None,
) -> GeneratorSetup:
  """Builds the generator for `model` and `dataset`.

  Args:
    config: the experiment config (generator sizes, steps, learning rate, ...).
    model: the classifier the teachers share.
    dataset: image shape and pixel statistics.
    embedding_table: float32 [num_classes, E], the condition A(c).
    kind: 'feature' or 'image'; default `config.generator`.
    global_teacher_weight: g; default `config.global_teacher_weight`.

  Returns:
    The GeneratorSetup.
  """
  kind = config.generator if kind is None else kind
  if global_teacher_weight is None:
    global_teacher_weight = config.global_teacher_weight
  generator = generator_lib.create_generator(
    kind,
    embedding_table,
    config.noise_dim,
    config.generator_hidden_dim,
    model.feature_dim,
    dataset.image_shape,
    tuple(np.asarray(dataset.mean).tolist()),
    tuple(np.asarray(dataset.std).tolist()),
  )
  return GeneratorSetup(
    generator=generator,
    optimizer=optax.adam(config.generator_learning_rate),
    kind=kind,
    noise_dim=config.noise_dim,
    noise_distribution=config.noise_distribution,
    steps=config.generator_steps,
    batch_size=config.generator_batch_size,
    ce_weight=config.generator_ce_weight,
    diversity_pairs=config.diversity_pairs,
    global_teacher_weight=global_teacher_weight,
  )


def setup_from_config(config: Any, model: nn.Module, dataset: Any) -> GeneratorSetup:
  """The generator of --generator conditioned on the --embedding of the class names."""
  table = embeddings.class_embeddings(
    dataset.class_names,
    config.embedding,
    config.embedding_template,
    model_name=config.embedding_model or None,
  )
  return create_setup(config, model, dataset, table)


def sample_logits(model: nn.Module, kind: str, params: Any, samples: jax.Array) -> jax.Array:
  """Logits of `model` on generated samples (head inputs or images)."""
  if kind == 'feature':
    return cast(jax.Array, model.apply({'params': params}, samples, method='head_logits'))
  return cast(jax.Array, model.apply({'params': params}, samples))


def memory_label_probs(seen_counts: jax.Array) -> jax.Array:
  """Uniform sampling weights over the memorized classes (every class before any)."""
  memorized = (seen_counts > 0).astype(jnp.float32)
  return jnp.where(jnp.any(memorized > 0), memorized, jnp.ones_like(memorized))


def memory_teacher_weights(
  label_counts: jax.Array,
  seen_counts: jax.Array,
  global_teacher_weight: float,
  label_count_prior: float = 0.0,
) -> jax.Array:
  """Teacher weights of the round's clients and the global model, per label.

  Args:
    label_counts: float [K, num_classes] training label counts of the round's clients.
    seen_counts: float [num_classes] the server's memory (labels learned so far,
      this round included).
    global_teacher_weight: g in [0, 1].
    label_count_prior: p, added to every client's count of a label held this round
      (FedGen's code starts its counts at 1).

  Returns:
    float32 [K + 1, num_classes]: rows 0..K-1 the clients, row K the global model.
    A label held this round: (1 - g) (n_{k,y} + p) / sum_j (n_{j,y} + p) for the clients
    and g for the global model; a memorized label nobody holds this round: 1 for the
    global model; a label never seen: all 0.
  """
  held_now = jnp.sum(label_counts, axis=0) > 0
  memorized = seen_counts > 0
  smoothed = label_counts + label_count_prior * held_now.astype(jnp.float32)[None]
  clients = (1.0 - global_teacher_weight) * generator_lib.teacher_weights(smoothed)
  global_row = jnp.where(held_now, global_teacher_weight, memorized.astype(jnp.float32))
  return jnp.concatenate([clients, global_row[None]]).astype(jnp.float32)


def train_on_teachers(
  setup: GeneratorSetup,
  model: nn.Module,
  state: generator_lib.GeneratorState,
  teacher_params: Any | None,
  label_counts: jax.Array,
  global_params: Any,
  seen_counts: jax.Array,
  rng: jax.Array,
):
  """One round of generator training on the round's clients and the global model.

  Args:
    setup: the generator setup.
    model: the classifier architecture shared by all teachers.
    state: the generator's params and optimizer state.
    teacher_params: the round's client models, stacked [K, ...] (None when
      setup.global_teacher_weight is 1: the global model teaches alone).
    label_counts: float [K, num_classes] training label counts of those clients.
    global_params: the global model.
    seen_counts: float [num_classes] the server's label memory (this round included).
    rng: key.

  Returns:
    (new generator state, {'loss', 'ce', 'diversity'}).
  """
  memorized = (seen_counts > 0).astype(jnp.float32)
  if teacher_params is None:
    teacher_params = jax.tree.map(lambda g: g[None], global_params)
    weights = memorized[None]
  else:
    teacher_params = jax.tree.map(
      lambda t, g: jnp.concatenate([t, g[None]]), teacher_params, global_params
    )
    weights = memory_teacher_weights(
      label_counts, seen_counts, setup.global_teacher_weight, setup.label_count_prior
    )

  def teacher_logits_fn(samples):
    return jax.vmap(lambda p: sample_logits(model, setup.kind, p, samples))(teacher_params)

  return generator_lib.train_generator(
    setup.generator,
    state,
    setup.optimizer,
    teacher_logits_fn,
    memorized,
    weights,
    rng,
    num_steps=setup.steps,
    batch_size=setup.batch_size,
    ce_weight=setup.ce_weight,
    diversity_pairs=setup.diversity_pairs,
    ce_weighting=setup.ce_weighting,
    noise_dim=setup.noise_dim,
    noise_distribution=setup.noise_distribution,
  )


def client_label_counts(
  data: Any, index_row: jax.Array, count: jax.Array, num_classes: int
) -> jax.Array:
  """float32 [num_classes] label counts of one client's training examples."""
  valid = (jnp.arange(index_row.shape[0]) < count).astype(jnp.float32)
  labels = data.train_labels[index_row]
  return jnp.zeros((num_classes,), jnp.float32).at[labels].add(valid)


def labelled_output(
  params: Any,
  start: Any,
  loss: jax.Array,
  data: Any,
  index_row: jax.Array,
  count: jax.Array,
  num_classes: int,
):
  """A ClientOutput whose update carries the parameter change and the label counts."""
  update = {
    'delta': jax.tree.map(jnp.subtract, params, start),
    'label_counts': client_label_counts(data, index_row, count, num_classes),
  }
  return base.ClientOutput(
    update=update,
    num_examples=count.astype(jnp.float32),
    loss=loss,
    finite=base.all_finite(params, loss),
  )


def round_teachers(
  setup: GeneratorSetup, server: Any, deltas: Any, client_models: Any | None
) -> Any | None:
  """The round's client teachers: None when the global model teaches alone (g = 1),
  else `client_models`, or the clients' updated models server.params + delta."""
  if setup.global_teacher_weight >= 1.0:
    return None
  if client_models is not None:
    return client_models
  return jax.tree.map(lambda p, d: p[None] + d, server.params, deltas)


def aggregate_and_distill(
  algorithm: Any, server: Any, outputs: Any, rng: jax.Array, client_models: Any | None = None
):
  """FedAvg aggregation, then a round of generator training on the teachers.

  Args:
    algorithm: a FedAvg subclass with `setup` (GeneratorSetup) and `model`.
    server: server state with params, opt_state, generator and seen_counts.
    outputs: the cohort's `labelled_output`s, stacked.
    rng: key.
    client_models: the cohort's client teachers, stacked; None: the clients' updated
      models, rebuilt as server.params + delta. Unused when the global model teaches
      alone (global_teacher_weight 1).

  Returns:
    (params, opt_state, generator state, seen_counts): the memory with this round's
    label counts added.
  """
  deltas, counts = outputs.update['delta'], outputs.update['label_counts']
  params, opt_state = algorithm.apply_mean_update(
    server.params, server.opt_state, deltas, outputs.num_examples
  )
  seen_counts = server.seen_counts + jnp.sum(counts, 0)
  teachers = round_teachers(algorithm.setup, server, deltas, client_models)
  generator, _ = train_on_teachers(
    algorithm.setup, algorithm.model, server.generator, teachers, counts, params, seen_counts, rng
  )
  return params, opt_state, generator, seen_counts
