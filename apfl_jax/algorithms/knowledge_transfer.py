"""Server-side data-free knowledge transfer, shared by FedGen and AP-FL.

The round's client models are the teachers. The server rebuilds them from what the
clients sent (start params + their update), evaluates all of them on a generated batch
in one vmap, and trains the generator G(z, A(y)) on

  L_G = lambda * sum_k w_{k,y} CE(teacher_k(G(z, A(y))), y) + (1 - lambda) * L_div,

with w_{k,y} = n_{k,y} / sum_j n_{j,y} from the label counts the clients sent this round
(optionally a share `global_teacher_weight` of every label goes to the global model).
Labels are drawn uniformly from the labels some teacher holds: no teacher can teach a
class nobody holds, so those classes are reached only through their embedding
(zero-shot).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax import generator as generator_lib
from apfl_jax.algorithms import base


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
    global_teacher_weight: share of each label's teacher weight given to the global model.
  """
  generator: nn.Module
  optimizer: optax.GradientTransformation
  kind: str
  noise_dim: int
  noise_distribution: str
  steps: int
  batch_size: int
  ce_weight: float
  global_teacher_weight: float


def create_setup(config: Any, model: nn.Module, dataset: Any,
                 embedding_table: np.ndarray) -> GeneratorSetup:
  """Builds the generator named by the config for `model` and `dataset`."""
  generator = generator_lib.create_generator(
      config.generator, embedding_table, config.noise_dim, config.generator_hidden_dim,
      model.feature_dim, dataset.image_shape, tuple(np.asarray(dataset.mean).tolist()),
      tuple(np.asarray(dataset.std).tolist()))
  return GeneratorSetup(
      generator=generator, optimizer=optax.adam(config.generator_learning_rate),
      kind=config.generator, noise_dim=config.noise_dim,
      noise_distribution=config.noise_distribution, steps=config.generator_steps,
      batch_size=config.generator_batch_size, ce_weight=config.generator_ce_weight,
      global_teacher_weight=config.global_teacher_weight)


def sample_logits(model: nn.Module, kind: str, params: Any, samples: jax.Array) -> jax.Array:
  """Logits of `model` on generated samples (head inputs or images)."""
  if kind == 'feature':
    return model.apply({'params': params}, samples, method='head_logits')
  return model.apply({'params': params}, samples)


def train_on_teachers(setup: GeneratorSetup, model: nn.Module,
                      state: generator_lib.GeneratorState, teacher_params: Any,
                      label_counts: jax.Array, global_params: Any, rng: jax.Array):
  """One round of generator training on the given teachers.

  Args:
    setup: the generator setup.
    model: the classifier architecture shared by all teachers.
    state: the generator's params and optimizer state.
    teacher_params: the round's client models, stacked [K, ...].
    label_counts: float [K, num_classes] training label counts of those clients.
    global_params: the global model (used when setup.global_teacher_weight > 0).
    rng: key.

  Returns:
    (new generator state, {'loss', 'ce', 'diversity'}).
  """
  weights = generator_lib.teacher_weights(label_counts)
  held = (jnp.sum(label_counts, axis=0) > 0).astype(jnp.float32)
  if setup.global_teacher_weight > 0:
    teacher_params = jax.tree.map(lambda t, g: jnp.concatenate([t, g[None]]),
                                  teacher_params, global_params)
    weights = jnp.concatenate([(1 - setup.global_teacher_weight) * weights,
                               setup.global_teacher_weight * held[None]])

  def teacher_logits_fn(samples):
    return jax.vmap(lambda p: sample_logits(model, setup.kind, p, samples))(teacher_params)

  return generator_lib.train_generator(
      setup.generator, state, setup.optimizer, teacher_logits_fn, held, weights, rng,
      num_steps=setup.steps, batch_size=setup.batch_size, ce_weight=setup.ce_weight,
      noise_dim=setup.noise_dim, noise_distribution=setup.noise_distribution)


def client_label_counts(data: Any, index_row: jax.Array, count: jax.Array,
                        num_classes: int) -> jax.Array:
  """float32 [num_classes] label counts of one client's training examples."""
  valid = (jnp.arange(index_row.shape[0]) < count).astype(jnp.float32)
  labels = data.train_labels[index_row]
  return jnp.zeros((num_classes,), jnp.float32).at[labels].add(valid)


def labelled_output(params: Any, start: Any, loss: jax.Array, data: Any,
                    index_row: jax.Array, count: jax.Array, num_classes: int):
  """A ClientOutput whose update carries the parameter change and the label counts."""
  update = {'delta': jax.tree.map(jnp.subtract, params, start),
            'label_counts': client_label_counts(data, index_row, count, num_classes)}
  return base.ClientOutput(update=update, num_examples=count.astype(jnp.float32), loss=loss,
                           finite=base.all_finite(params, loss))


def aggregate_and_distill(algorithm: Any, server: Any, outputs: Any, rng: jax.Array):
  """FedAvg aggregation, then a round of generator training on the clients as teachers.

  Args:
    algorithm: a FedAvg subclass with `setup` (GeneratorSetup) and `model`.
    server: server state with params, opt_state and generator.
    outputs: the cohort's `labelled_output`s, stacked.
    rng: key.

  Returns:
    (params, opt_state, generator state, taught_labels [num_classes] float 0/1).
  """
  deltas, counts = outputs.update['delta'], outputs.update['label_counts']
  params, opt_state = algorithm.apply_mean_update(server.params, server.opt_state, deltas,
                                                  outputs.num_examples)
  teachers = jax.tree.map(lambda p, d: p[None] + d, server.params, deltas)
  generator, _ = train_on_teachers(algorithm.setup, algorithm.model, server.generator,
                                   teachers, counts, params, rng)
  return params, opt_state, generator, (jnp.sum(counts, 0) > 0).astype(jnp.float32)
