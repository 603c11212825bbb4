"""Server-side semantic generator G(z, A(c)) trained by data-free knowledge transfer.

AP-FL (arXiv 2503.00407) extends FedGen (Zhu et al., ICML 2021): the server
trains a conditional generator so that the clients' models (the teachers)
classify its samples as the class they were generated for, then the generator
is used to train friend models and to sample classes no client holds. The
condition is the semantic embedding A(c) of the class name
(`apfl_jax.algorithms.generative.embeddings`), not a one-hot label, which is what makes zero-shot
classes reachable.

Generator objective, one step on a batch of B labels y_i ~ p(y) and noise z_i:

  L_G = lambda * (1/B) sum_i sum_k w_{k,y_i} CE(f_k(G(z_i, A(y_i))), y_i)
        + (1 - lambda) * exp(-mean_{i,j} d_z(i,j) d_G(i,j)),
  w_{k,y} = n_{k,y} / sum_j n_{j,y},
  d_z(i,j) = mean_d (z_{i,d} - z_{j,d})^2,  d_G(i,j) = mean_d |G_{i,d} - G_{j,d}|.

Choices taken from FedGen's official code (github.com/zhuangdizhu/FedGen):
  * Feature-space generator: concat(z, condition) -> Dense(hidden) -> BatchNorm
    -> ReLU -> Dense(feature_dim), the output being the classifier head's input
    (FedGen's `Generator` with `latent_layer_idx=-1`). FedGen's
    GENERATORCONFIGS use hidden 256 / noise 32 for MNIST-size data and hidden
    512 / noise 64 for CIFAR (`FEDGEN_SIZES`).
  * Noise z ~ U[0, 1) (`torch.rand`), the default `noise_distribution`; 'normal'
    is offered as an alternative.
  * Adam with lr 1e-4 to 3e-4 (FedGen's `ensemble_lr`), betas (0.9, 0.999).
  * DiversityLoss(metric='l1'): the pairwise distance matrices include the
    diagonal i = j (where both distances are 0), outputs are flattened per
    sample, noise distance 'l2' is the MEAN squared difference (no sqrt).
  * Teacher weights: a teacher's share of each label's examples
    (FedGen's `get_label_weights`, without its minimum-count threshold, which
    the caller can apply to `label_counts`; its counts start at 1 per label,
    `knowledge_transfer.memory_teacher_weights`' label_count_prior).

Where we differ from FedGen's official code (each a choice of `ce_weighting`):
  * Teacher CE ('per_sample', ours and the formula above): per-sample CE times
    the teacher's weight for that sample's label, averaged over the batch and
    summed over teachers. The official code writes
    `torch.mean(nll[B] * weight[B, 1])`, which broadcasts to a [B, B] matrix:
    mean_i(w_{k,y_i}) * mean_i(nll_{k,i}) per teacher ('official'), so a
    teacher's CE on labels it does not hold counts as much as on its own.

Choices where FedGen and AP-FL are silent:
  * BatchNorm always normalises with batch statistics and keeps no running
    averages, so the generator has only the 'params' collection and
    `apply({'params': p}, z, y)` is a pure function (FedGen trains the
    generator in PyTorch train mode, i.e. with batch statistics, too). The
    scale and bias are learnable; the variance is the biased one, eps 1e-5, as
    torch.nn.BatchNorm uses in training.
  * Batch statistics carry a pitfall: in a batch whose labels are all equal the
    condition A(c) is the same row for every sample, so the first BatchNorm
    subtracts it away and the output no longer depends on c. Every generator
    therefore takes an optional `stats_mask` that picks the rows whose
    statistics normalise the whole batch (a virtual-batch-norm reference,
    Salimans et al. 2016), and `generate` can append a reference batch of
    `reference_labels` for that purpose. Training uses the batch itself.
  * `ImageGenerator` is a two-upsampling DCGAN generator whose tanh output is
    mapped to pixels in [0, 1] and then standardised with the data set's
    per-channel mean and std, the space the classifiers take.
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms.generative.embeddings import SemanticEmbeddingTable
from apfl_jax.core.errors import ConfigError
from apfl_jax.core.local_training import Params

GENERATORS = ('feature', 'image')
# Pairs of samples the diversity loss spreads apart: every pair (FedGen) or same-label pairs.
DIVERSITY_PAIRS = ('all', 'same_label')
NOISE_DISTRIBUTIONS = ('uniform', 'normal')
# How the teacher CE weighs a sample: by its own label's weight, or FedGen's code's broadcast.
CE_WEIGHTINGS = ('per_sample', 'official')
# FedGen's GENERATORCONFIGS: data-set family -> (hidden_dim, noise_dim).
FEDGEN_SIZES = {'mnist': (256, 32), 'cifar': (512, 64)}
_BN_EPS = 1e-5

# teacher_logits_fn(samples [B, ...]) -> [K, B, num_classes].
TeacherLogitsFn = Callable[[jax.Array], jax.Array]


class BatchStatsNorm(nn.Module):
  """BatchNorm that always uses batch statistics and keeps no state.

  y = scale * (x - mu) / sqrt(var + eps) + bias, with mu and the biased var
  taken over every axis but the last (batch and, for images, space) and over
  the rows selected by `stats_mask`. Only 'params' (scale, bias) exist.

  Attributes:
    eps: added to the variance.
  """

  eps: float = _BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array, stats_mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` [B, ..., F].

    Args:
      x: activations, channels last.
      stats_mask: optional bool/float [B]; the statistics come from the rows
        where it is nonzero (all rows when None). Every row is normalised.

    Returns:
      The normalised activations, shape of `x`.
    """
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if stats_mask is None:
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
    else:
      w = jnp.asarray(stats_mask, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
      w = jnp.broadcast_to(w, x.shape[:-1] + (1,))
      count = jnp.sum(w)
      mean = jnp.sum(w * x, axis=axes) / count
      var = jnp.sum(w * jnp.square(x - mean), axis=axes) / count
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class FeatureGenerator(nn.Module):
  """FedGen's generator in feature space: G(z, A(c)) -> the head's input.

  concat(z, A(c)) -> Dense(hidden_dim) -> BatchStatsNorm -> ReLU
  -> Dense(feature_dim).

  Attributes:
    embedding_table: float32 [num_classes, E], the frozen condition A.
    noise_dim: width of z.
    hidden_dim: width of the hidden layer.
    feature_dim: width of the output (the classifier's `feature_dim`).
  """

  embedding_table: np.ndarray
  noise_dim: int
  hidden_dim: int
  feature_dim: int

  @nn.compact
  def __call__(
    self, noise: jax.Array, labels: jax.Array, stats_mask: jax.Array | None = None
  ) -> jax.Array:
    """Generates features.

    Args:
      noise: float [B, noise_dim].
      labels: int [B] class indices.
      stats_mask: optional [B]; the rows whose statistics BatchNorm uses.

    Returns:
      float32 [B, feature_dim].
    """
    cond = SemanticEmbeddingTable(self.embedding_table)(labels)
    x = jnp.concatenate([noise.astype(jnp.float32), cond], axis=-1)
    x = nn.Dense(self.hidden_dim)(x)
    x = nn.relu(BatchStatsNorm()(x, stats_mask))
    return nn.Dense(self.feature_dim)(x)


class ImageGenerator(nn.Module):
  """DCGAN-style generator of standardised images G(z, A(c)).

  concat(z, A(c)) -> Dense(2*base*(H/4)^2) -> BN -> ReLU -> reshape
  [H/4, W/4, 2*base] -> ConvTranspose(base, 4x4, stride 2) -> BN -> ReLU
  -> ConvTranspose(C, 4x4, stride 2) -> tanh = t; pixels p = (t + 1) / 2 in
  [0, 1]; returns (p - mean) / std. BN is `BatchStatsNorm`.

  Attributes:
    embedding_table: float32 [num_classes, E], the frozen condition A.
    noise_dim: width of z.
    image_shape: (H, W, C) with H = W divisible by 4 (28 or 32).
    mean: per-channel pixel mean (on the [0, 1] scale), length C.
    std: per-channel pixel std, length C.
    base: channels of the last hidden layer.
  """

  embedding_table: np.ndarray
  noise_dim: int
  image_shape: tuple[int, int, int]
  mean: Sequence[float]
  std: Sequence[float]
  base: int = 64

  @nn.compact
  def __call__(
    self, noise: jax.Array, labels: jax.Array, stats_mask: jax.Array | None = None
  ) -> jax.Array:
    """Generates images.

    Args:
      noise: float [B, noise_dim].
      labels: int [B] class indices.
      stats_mask: optional [B]; the rows whose statistics BatchNorm uses.

    Returns:
      float32 [B, H, W, C], standardised with `mean` and `std`.
    """
    height, width, channels = self.image_shape
    cond = SemanticEmbeddingTable(self.embedding_table)(labels)
    x = jnp.concatenate([noise.astype(jnp.float32), cond], axis=-1)
    x = nn.Dense(2 * self.base * (height // 4) * (width // 4))(x)
    x = nn.relu(BatchStatsNorm()(x, stats_mask))
    x = x.reshape(x.shape[0], height // 4, width // 4, 2 * self.base)
    x = nn.ConvTranspose(self.base, (4, 4), strides=(2, 2), padding='SAME')(x)
    x = nn.relu(BatchStatsNorm()(x, stats_mask))
    x = nn.ConvTranspose(channels, (4, 4), strides=(2, 2), padding='SAME')(x)
    pixels = (jnp.tanh(x) + 1.0) / 2.0
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (pixels - mean) / std


def create_generator(
  kind: str,
  embedding_table: np.ndarray,
  noise_dim: int,
  hidden_dim: int,
  feature_dim: int,
  image_shape: Sequence[int],
  mean: Sequence[float],
  std: Sequence[float],
) -> nn.Module:
  """Builds a generator by kind.

  Args:
    kind: one of GENERATORS: 'feature' (FeatureGenerator, uses hidden_dim and
      feature_dim) or 'image' (ImageGenerator, uses image_shape, mean, std).
    embedding_table: float32 [num_classes, E], e.g. from
      `embeddings.class_embeddings`.
    noise_dim: width of z.
    hidden_dim: hidden width of the feature generator.
    feature_dim: the classifier's `feature_dim`.
    image_shape: (H, W, C) of the data set.
    mean: per-channel pixel mean of the data set.
    std: per-channel pixel std of the data set.

  Returns:
    The unbound module.

  Raises:
    ConfigError: unknown kind, or an image shape that is not square with a
      side divisible by 4.
  """
  if kind == 'feature':
    return FeatureGenerator(embedding_table, noise_dim, hidden_dim, feature_dim)
  if kind == 'image':
    height, width, channels = (int(s) for s in image_shape)
    if height != width or height % 4:
      raise ConfigError(
        f'--generator=image needs square images with a side '
        f'divisible by 4, got {tuple(image_shape)}'
      )
    return ImageGenerator(
      embedding_table,
      noise_dim,
      (height, width, channels),
      tuple(float(m) for m in np.ravel(mean)),
      tuple(float(s) for s in np.ravel(std)),
    )
  raise ConfigError(f'--generator={kind!r} is not one of {list(GENERATORS)}')


def sample_noise(rng: jax.Array, batch: int, noise_dim: int, distribution: str) -> jax.Array:
  """Draws z.

  Args:
    rng: PRNG key.
    batch: number of rows.
    noise_dim: width of z.
    distribution: 'uniform' (U[0, 1), FedGen's `torch.rand`) or 'normal'
      (N(0, 1)).

  Returns:
    float32 [batch, noise_dim].

  Raises:
    ConfigError: unknown distribution.
  """
  if distribution == 'uniform':
    return jax.random.uniform(rng, (batch, noise_dim), jnp.float32)
  if distribution == 'normal':
    return jax.random.normal(rng, (batch, noise_dim), jnp.float32)
  raise ConfigError(
    f'--noise_distribution={distribution!r} is not one of {list(NOISE_DISTRIBUTIONS)}'
  )


def diversity_loss(
  noise: jax.Array, outputs: jax.Array, labels: jax.Array | None = None
) -> jax.Array:
  """FedGen's DiversityLoss (metric 'l1'), over all pairs or over same-label pairs.

  L_div = exp(-mean_{(i,j) in P} d_z(i,j) d_G(i,j)), with d_z(i,j) =
  mean_d (z_{i,d} - z_{j,d})^2 and d_G(i,j) = mean_d |G_{i,d} - G_{j,d}| on the
  outputs flattened per sample. P is every ordered pair including i = j
  (FedGen's; `labels` None) or, with `labels`, the ordered pairs of equal labels
  (i = j included): a conditional generator then cannot pay for samples that
  ignore z with the distance between classes. It is in (0, 1] and falls as
  samples from different noise spread apart.

  Args:
    noise: [B, noise_dim].
    outputs: [B, ...] generated samples.
    labels: optional int [B]; restricts P to pairs of the same label.

  Returns:
    A scalar.
  """
  flat = outputs.reshape(outputs.shape[0], -1)
  noise_dist = jnp.mean(jnp.square(noise[:, None, :] - noise[None, :, :]), axis=-1)
  layer_dist = jnp.mean(jnp.abs(flat[:, None, :] - flat[None, :, :]), axis=-1)
  if labels is None:
    return jnp.exp(-jnp.mean(noise_dist * layer_dist))
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  return jnp.exp(-jnp.sum(same * noise_dist * layer_dist) / jnp.sum(same))


def teacher_weights(label_counts: jax.Array) -> jax.Array:
  """Each teacher's share of each label: w_{k,y} = n_{k,y} / sum_j n_{j,y}.

  Args:
    label_counts: [K, num_classes] examples of each label held by each teacher.

  Returns:
    float32 [K, num_classes]; each column sums to 1 over teachers for a label
    someone holds and is all 0 for a label nobody holds (no NaN).
  """
  counts = jnp.asarray(label_counts, jnp.float32)
  total = jnp.sum(counts, axis=0, keepdims=True)
  return jnp.where(total > 0, counts / jnp.maximum(total, 1.0), 0.0)


def teacher_cross_entropy(
  teacher_logits: jax.Array, labels: jax.Array, weights: jax.Array, weighting: str = 'per_sample'
) -> jax.Array:
  """The weighted ensemble CE.

  per_sample: (1/B) sum_i sum_k w_{k,y_i} CE(logits_{k,i}, y_i);
  official (FedGen's code, `mean(nll[B] * weight[B, 1])`):
    sum_k [(1/B) sum_i w_{k,y_i}] [(1/B) sum_i CE(logits_{k,i}, y_i)].

  Args:
    teacher_logits: [K, B, num_classes].
    labels: int [B].
    weights: [K, num_classes], e.g. from `teacher_weights`.
    weighting: one of CE_WEIGHTINGS.

  Returns:
    A scalar.
  """
  log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  sample_weights = weights[:, labels]
  if weighting == 'official':
    return jnp.sum(jnp.mean(sample_weights, axis=1) * jnp.mean(nll, axis=1))
  if weighting != 'per_sample':
    raise ConfigError(f'teacher CE weighting {weighting!r} is not one of {list(CE_WEIGHTINGS)}')
  return jnp.mean(jnp.sum(sample_weights * nll, axis=0))


@flax.struct.dataclass
class GeneratorState:
  """The generator's trainable state.

  Attributes:
    params: the generator's 'params' collection.
    opt_state: the optax state of its optimiser.
  """

  params: Params
  opt_state: optax.OptState


def init_generator(
  generator: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array, batch: int = 2
) -> GeneratorState:
  """Initialises the generator's parameters and optimiser state.

  Args:
    generator: a FeatureGenerator or ImageGenerator.
    optimizer: e.g. optax.adam(3e-4) (FedGen).
    rng: PRNG key for the parameters.
    batch: rows of the dummy input used to trace shapes.

  Returns:
    The initial GeneratorState.
  """
  noise = jnp.zeros((batch, generator.noise_dim), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)
  params = generator.init(rng, noise, labels)['params']
  return GeneratorState(params=params, opt_state=optimizer.init(params))


def _check_noise_dim(generator: nn.Module, noise_dim: int) -> None:
  """Raises ConfigError when noise_dim is not the generator's."""
  if noise_dim != generator.noise_dim:
    raise ConfigError(
      f'noise_dim={noise_dim} but the generator was built with noise_dim={generator.noise_dim}'
    )


def train_generator(
  generator: nn.Module,
  state: GeneratorState,
  optimizer: optax.GradientTransformation,
  teacher_logits_fn: TeacherLogitsFn,
  label_probs: jax.Array,
  weights: jax.Array,
  rng: jax.Array,
  *,
  num_steps: int,
  batch_size: int,
  ce_weight: float,
  noise_dim: int,
  noise_distribution: str,
  diversity_pairs: str = 'all',
  ce_weighting: str = 'per_sample',
) -> tuple[GeneratorState, dict[str, jax.Array]]:
  """Trains the generator for `num_steps` optax steps (a lax.scan).

  Each step draws y_i ~ Categorical(label_probs), z_i ~ noise_distribution,
  x_i = G(z_i, A(y_i)) and descends
    L_G = ce_weight * teacher_cross_entropy(teacher_logits_fn(x), y, weights)
          + (1 - ce_weight) * diversity_loss(z, x[, y])
  with respect to the generator's parameters only: the teachers' parameters
  are closed over by `teacher_logits_fn`, so no gradient is taken for them.

  Pure and jit-able with `generator`, `optimizer`, `teacher_logits_fn` and the
  keyword arguments static, e.g. by closing over them:
    step = jax.jit(functools.partial(train_generator, generator, optimizer=opt,
                                     teacher_logits_fn=fn, num_steps=..., ...))
  To change teachers without recompiling, build `teacher_logits_fn` inside the
  jitted function from traced teacher parameters, e.g.
    lambda x: jax.vmap(lambda p: model.apply({'params': p}, x,
                                             method=model.head_logits))(stacked).

  Args:
    generator: a FeatureGenerator or ImageGenerator.
    state: its current GeneratorState.
    optimizer: the optimiser `state.opt_state` belongs to.
    teacher_logits_fn: samples [B, ...] -> logits [K, B, num_classes].
    label_probs: [num_classes] sampling probabilities of the labels
      (unnormalised is fine; zero entries are never drawn).
    weights: [K, num_classes] teacher weights (`teacher_weights`).
    rng: PRNG key.
    num_steps: number of steps (static).
    batch_size: samples per step (static).
    ce_weight: lambda, the weight of the teacher CE; the diversity term gets
      1 - lambda.
    noise_dim: width of z; must equal `generator.noise_dim`.
    noise_distribution: 'uniform' or 'normal'.
    diversity_pairs: 'all' (FedGen's diversity over every pair of the batch) or
      'same_label' (only pairs of equal labels, `diversity_loss` with y).
    ce_weighting: 'per_sample' or 'official' (`teacher_cross_entropy`).

  Returns:
    (the new GeneratorState, {'loss', 'ce', 'diversity'} of the last step,
    measured before its update).

  Raises:
    ConfigError: noise_dim differs from the generator's, or an unknown
      noise distribution.
  """
  _check_noise_dim(generator, noise_dim)
  if noise_distribution not in NOISE_DISTRIBUTIONS:
    raise ConfigError(
      f'--noise_distribution={noise_distribution!r} is not one of {list(NOISE_DISTRIBUTIONS)}'
    )
  if diversity_pairs not in DIVERSITY_PAIRS:
    raise ConfigError(
      f'--diversity_pairs={diversity_pairs!r} is not one of {list(DIVERSITY_PAIRS)}'
    )
  logits = jnp.log(jnp.asarray(label_probs, jnp.float32))

  def loss_fn(params, noise, labels):
    samples = cast(jax.Array, generator.apply({'params': params}, noise, labels))
    ce = teacher_cross_entropy(teacher_logits_fn(samples), labels, weights, ce_weighting)
    div = diversity_loss(noise, samples, labels if diversity_pairs == 'same_label' else None)
    return ce_weight * ce + (1.0 - ce_weight) * div, (ce, div)

  def step(carry, key):
    label_key, noise_key = jax.random.split(key)
    labels = jax.random.categorical(label_key, logits, shape=(batch_size,))
    noise = sample_noise(noise_key, batch_size, noise_dim, noise_distribution)
    (loss, (ce, div)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      carry.params, noise, labels
    )
    updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
    params = optax.apply_updates(carry.params, updates)
    return GeneratorState(params, opt_state), (loss, ce, div)

  state, (loss, ce, div) = jax.lax.scan(step, state, jax.random.split(rng, num_steps))
  return state, {'loss': loss[-1], 'ce': ce[-1], 'diversity': div[-1]}


def generate(
  generator: nn.Module,
  params: Params,
  rng: jax.Array,
  labels: jax.Array,
  noise_dim: int,
  noise_distribution: str,
  reference_labels: jax.Array | None = None,
) -> jax.Array:
  """Samples G(z, A(y)) for given labels, held by clients or not.

  With `reference_labels` None, BatchNorm uses the statistics of this batch,
  exactly as in training; use it for batches whose labels are drawn like the
  training labels. A batch of one class (e.g. zero-shot sampling of a class no
  client holds) needs `reference_labels` (e.g. every class, or labels drawn
  from the training distribution): a reference batch with fresh noise is run
  alongside and only its statistics normalise the samples, so each sample
  depends on its own (z, y) and the reference, not on the rest of the batch.

  Args:
    generator: a FeatureGenerator or ImageGenerator.
    params: its 'params'.
    rng: PRNG key.
    labels: int [B] classes to generate.
    noise_dim: width of z; must equal `generator.noise_dim`.
    noise_distribution: 'uniform' or 'normal'.
    reference_labels: optional int [R] labels of the reference batch.

  Returns:
    [B, feature_dim] features or [B, H, W, C] standardised images.

  Raises:
    ConfigError: noise_dim differs from the generator's, or an unknown
      noise distribution.
  """
  _check_noise_dim(generator, noise_dim)
  labels = jnp.asarray(labels, jnp.int32)
  batch = labels.shape[0]
  noise_key, reference_key = jax.random.split(rng)
  noise = sample_noise(noise_key, batch, noise_dim, noise_distribution)
  if reference_labels is None:
    return cast(jax.Array, generator.apply({'params': params}, noise, labels))
  reference_labels = jnp.asarray(reference_labels, jnp.int32)
  reference_noise = sample_noise(
    reference_key, reference_labels.shape[0], noise_dim, noise_distribution
  )
  stats_mask = jnp.concatenate(
    [jnp.zeros((batch,), jnp.float32), jnp.ones(reference_labels.shape, jnp.float32)]
  )
  samples = cast(
    jax.Array,
    generator.apply(
      {'params': params},
      jnp.concatenate([noise, reference_noise]),
      jnp.concatenate([labels, reference_labels]),
      stats_mask,
    ),
  )
  return samples[:batch]
