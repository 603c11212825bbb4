"""FedGen (Zhu, Hong and Zhou, ICML 2021): data-free knowledge distillation with a
server-side feature generator.

Clients train as in FedAvg, regularised by generated features (the generator is frozen
on the clients), in one of two forms (--fedgen_regularizer):

  fedgen (the official code, github.com/zhuangdizhu/FedGen, `UserpFedGen.train`): in
  round t = 0, 1, ... (t = the server rounds done when the client started)
    CE(model(x), y) + alpha_t * CE(head(G(z', y_s)), y_s)
                    + beta_t * KL(softmax(head(G(z, y))) || softmax(model(x))),
    alpha_t = max(1e-4, alpha_0 * 0.98^t), beta_t = max(1e-4, beta_0 * 0.98^t),
  with y the real batch's labels (the KL target gets no gradient; KL is the batch mean,
  torch's KLDivLoss(reduction='batchmean'); G(z, y) is normalised with the statistics of a
  reference batch of labels drawn from the memory, `generator.generate`'s
  reference_labels: the official code runs G in eval mode on clients, and a batch's own
  statistics would subtract a one-label batch's label away), y_s ~ U(labels the server
  has memorized: every label it has received, `knowledge_transfer.memory_label_probs`) as
  many as the batch, and no regulariser at all in round 0 (the generator is untrained then);
  alpha_0 = beta_0 = 10 is the code's MNIST setting;
  pfllib (PFLlib's clientgen.py): from round 0
    CE(model(x), y) + alpha * CE(head(G(z, y_s)), y_s).

The clients send their update and their label counts; the server averages the updates
(FedAvg) and trains the generator on the round's client models as teachers
(`knowledge_transfer`). Where the paper is silent and the official code differs from our
default, a flag gives the code's behaviour: the generator's teacher CE weighting
(`--fedgen_teacher_ce=official`), label counts starting at 1
(`--fedgen_label_count_prior=1`) and the clients' learning rate decaying 0.99 a round
(`--fedgen_client_lr_decay=0.99`). `generator_optimizer` builds the official code's
generator optimizer: Adam with L2 weight decay (1e-2) and its learning rate multiplied by
0.98 after every round. As in the original, A(y) defaults to a one-hot code (--embedding=onehot) and
the generator makes head inputs (--generator=feature). Personalized accuracy is the global
model's, as for FedAvg.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from apfl_jax.algorithms import base, registry
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.core import local_training, options
from apfl_jax.core.errors import ConfigError

FEDGEN_REGULARIZERS = ('fedgen', 'pfllib')

# The official code's per-round decay of alpha_t and beta_t (`exp_lr_scheduler`) and floor.
WEIGHT_DECAY_RATE = 0.98
WEIGHT_FLOOR = 1e-4


@flax.struct.dataclass
class FedGenServer:
  """Global model, its optimizer state, the generator, the label memory, rounds done.

  Attributes:
    seen_counts: float [num_classes] labels the server has learned from, summed over
      every round (`knowledge_transfer.aggregate_and_distill`).
  """

  params: Any
  opt_state: Any
  generator: generator_lib.GeneratorState
  seen_counts: jax.Array
  round: jax.Array


def generator_optimizer(
  learning_rate: float, weight_decay: float, lr_decay: float, steps_per_round: int
) -> optax.GradientTransformation:
  """The official FedGen generator optimizer.

  torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay) (L2: the decay is
  added to the gradient before Adam's moments, not decoupled as in AdamW) with an
  ExponentialLR(gamma=lr_decay) stepped once per round: in round t (0-based) the
  learning rate is learning_rate * lr_decay^t.

  Args:
    learning_rate: the first round's learning rate.
    weight_decay: the L2 coefficient.
    lr_decay: the per-round factor (1: constant).
    steps_per_round: generator steps per round (--generator_steps).

  Returns:
    The optax optimizer.
  """
  schedule = optax.exponential_decay(
    learning_rate, transition_steps=steps_per_round, decay_rate=lr_decay, staircase=True
  )
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
    optax.scale_by_learning_rate(schedule),
  )


def round_weight(initial: float, round_index: jax.Array) -> jax.Array:
  """max(1e-4, initial * 0.98^t): alpha_t and beta_t of the official client loss."""
  return jnp.maximum(WEIGHT_FLOOR, initial * WEIGHT_DECAY_RATE ** round_index.astype(jnp.float32))


def _lr_decay(name: str, value: float) -> None:
  if not 0.0 < value <= 1.0:
    raise ConfigError(f'--{name} must be in (0, 1], got {value}')


@dataclasses.dataclass(frozen=True)
class FedGenOptions(options.Options):
  """FedGen's flags (the generator's own are `knowledge_transfer.GeneratorOptions`)."""

  TITLE = 'FedGen'
  fedgen_alpha: float = options.option(
    10.0,
    'FedGen: weight of the cross-entropy on generated features in the client loss (fedgen: '
    'alpha_0 of alpha_t = alpha_0 * 0.98^t).',
    check=options.non_negative,
  )
  fedgen_regularizer: str = options.option(
    'fedgen',
    'FedGen client regulariser: fedgen (official code: alpha_t and beta_t decay by 0.98 a '
    'round, latent KL term, none in round 0) or pfllib (constant alpha, no KL term, from '
    'round 0).',
    choices=FEDGEN_REGULARIZERS,
  )
  fedgen_beta: float = options.option(
    10.0,
    'FedGen (--fedgen_regularizer=fedgen): beta_0 of the latent KL term '
    'beta_t KL(p(.|G(z, y)) || p(.|x)) on the real batch.',
    check=options.non_negative,
  )
  fedgen_generator_weight_decay: float = options.option(
    1e-2,
    "FedGen: L2 weight decay of the generator's Adam (official code: 1e-2; PFLlib: 0).",
    check=options.non_negative,
  )
  fedgen_generator_lr_decay: float = options.option(
    0.98,
    "FedGen: the generator's learning rate is multiplied by this after every round "
    '(official code: 0.98; 1: none).',
    check=_lr_decay,
  )
  fedgen_teacher_ce: str = options.option(
    'per_sample',
    "FedGen: the generator's teacher CE weighs each sample by its teacher's weight for "
    "the sample's label (per_sample, the paper's formula) or, as the official code's "
    'broadcast mean(nll[B] * weight[B,1]) does, by the mean weight over the batch '
    '(official).',
    choices=generator_lib.CE_WEIGHTINGS,
  )
  fedgen_label_count_prior: float = options.option(
    0.0,
    "FedGen: added to every round client's count of each label some client holds, in "
    "the generator's client-teacher weights (official code: 1, its counts start at 1).",
    check=options.non_negative,
  )
  fedgen_client_lr_decay: float = options.option(
    1.0,
    "FedGen: the clients' learning rate in round t is lr * decay^max(t - 1, 0) (official "
    'code: 0.99, an ExponentialLR stepped with the round after each local training; '
    '1: constant).',
    check=_lr_decay,
  )


@registry.register(
  'fedgen',
  options=FedGenOptions,
  defaults={'generator': 'feature', 'global_teacher_weight': 0.0, 'embedding': 'onehot'},
)
class FedGen(FedAvg):
  """FedAvg whose clients also fit generated features of the global label space."""

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> FedGen:
    """FedGen with the official generator optimizer and the --fedgen_* client loss.

    Raises:
      ConfigError: --generator=image (FedGen's generator makes head inputs).
    """
    if config.generator != 'feature':
      raise ConfigError(
        '--generator=image is not FedGen: --algorithm=fedgen needs --generator=feature'
      )
    setup = knowledge_transfer.setup_from_config(config, context.model, context.dataset)
    setup = dataclasses.replace(
      setup,
      optimizer=generator_optimizer(
        config.generator_learning_rate,
        config.fedgen_generator_weight_decay,
        config.fedgen_generator_lr_decay,
        config.generator_steps,
      ),
      ce_weighting=config.fedgen_teacher_ce,
      label_count_prior=config.fedgen_label_count_prior,
    )
    return cls(
      *context.fedavg_args(),
      setup,
      config.fedgen_alpha,
      context.dataset.num_classes,
      config.fedgen_regularizer,
      config.fedgen_beta,
      config.fedgen_client_lr_decay,
    )

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    setup: knowledge_transfer.GeneratorSetup,
    alpha: float,
    num_classes: int,
    regularizer: str,
    beta: float,
    client_lr_decay: float = 1.0,
  ):
    """Builds FedGen.

    Args:
      model: the classifier (with `head_logits`).
      image_shape: (H, W, C).
      schedule: the local-training schedule.
      client_optimizer: the clients' optimizer.
      server_optimizer: the server's optimizer of the averaged update.
      setup: the generator and its training (its optimizer e.g. `generator_optimizer`).
      alpha: alpha (pfllib) or alpha_0 (fedgen).
      num_classes: number of classes.
      regularizer: 'fedgen' or 'pfllib' (module docstring).
      beta: beta_0 of the latent KL term (fedgen only).
      client_lr_decay: the clients' learning rate in round t is scaled by
        client_lr_decay^max(t - 1, 0) (1: constant).

    Raises:
      ValueError: an unknown regularizer.
    """
    if regularizer not in FEDGEN_REGULARIZERS:
      raise ValueError(f'unknown FedGen regularizer {regularizer!r}')
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    self.setup = setup
    self.alpha = alpha
    self.num_classes = num_classes
    self.regularizer = regularizer
    self.beta = beta
    self.client_lr_decay = client_lr_decay

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    model_rng, generator_rng = jax.random.split(rng)
    fedavg = super().init(model_rng)
    generator = generator_lib.init_generator(
      self.setup.generator, self.setup.optimizer, generator_rng
    )
    return base.AlgorithmState(
      server=FedGenServer(
        params=fedavg.server.params,
        opt_state=fedavg.server.opt_state,
        generator=generator,
        seen_counts=jnp.zeros((self.num_classes,), jnp.float32),
        round=jnp.zeros((), jnp.int32),
      ),
      clients=(),
    )

  def client_loss(self, server: FedGenServer) -> local_training.LossFn:
    """The client's local loss at the server state it started from (module docstring)."""
    setup, model = self.setup, self.model

    memory = jnp.log(knowledge_transfer.memory_label_probs(server.seen_counts))

    def generate(key, labels, reference_labels=None):
      return jax.lax.stop_gradient(
        generator_lib.generate(
          setup.generator,
          server.generator.params,
          key,
          labels,
          setup.noise_dim,
          setup.noise_distribution,
          reference_labels=reference_labels,
        )
      )

    def loss_fn(params, images, labels, example_mask, key):
      real_logits = model.apply({'params': params}, images)
      real = local_training.masked_cross_entropy(real_logits, labels, example_mask)
      label_key, noise_key = jax.random.split(key)
      sampled = jax.random.categorical(label_key, memory, shape=labels.shape)
      logits = model.apply({'params': params}, generate(noise_key, sampled), method='head_logits')
      teacher = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, sampled))
      if self.regularizer == 'pfllib':
        return real + self.alpha * teacher
      # BatchNorm statistics from a batch drawn like the generator's training labels: a
      # one-label real batch's own statistics would subtract its label away.
      reference = jax.random.categorical(
        jax.random.fold_in(key, 3), memory, shape=(setup.batch_size,)
      )
      target = jax.lax.stop_gradient(
        jax.nn.log_softmax(
          model.apply(
            {'params': params},
            generate(jax.random.fold_in(key, 2), labels, reference),
            method='head_logits',
          )
        )
      )
      kl = jnp.sum(jnp.exp(target) * (target - jax.nn.log_softmax(real_logits)), axis=-1)
      latent = jnp.sum(kl * example_mask) / jnp.maximum(jnp.sum(example_mask), 1.0)
      regularizer = (
        round_weight(self.alpha, server.round) * teacher
        + round_weight(self.beta, server.round) * latent
      )
      return real + jnp.where(server.round > 0, regularizer, 0.0)

    return loss_fn

  def client_optimizer_at(self, server: FedGenServer) -> local_training.OptimizerLike:
    """The client optimizer of the round the client starts in.

    With client_lr_decay < 1 its updates are scaled by decay^max(t - 1, 0), t the server
    rounds done: the official code's ExponentialLR(0.99), stepped with the round index
    after each local training, so a client trains round t at lr * 0.99^(t - 1) (with full
    participation; scaling the updates of SGD, momentum or Adam scales the learning rate).
    """
    if self.client_lr_decay == 1.0:
      return self.client_optimizer
    exponent = jnp.maximum(server.round - 1, 0).astype(jnp.float32)
    return optax.chain(
      local_training.as_transformation(self.client_optimizer),
      optax.scale(self.client_lr_decay**exponent),
    )

  def client_update(self, server, client, index_row, count, rng, data):
    params, loss = local_training.train_client(
      server.params,
      self.client_loss(server),
      self.client_optimizer_at(server),
      data,
      index_row,
      count,
      rng,
      self.schedule,
    )
    return client, knowledge_transfer.labelled_output(
      params, server.params, loss, data, index_row, count, self.num_classes
    )

  def server_update(self, server, outputs, rng):
    params, opt_state, generator, seen_counts = knowledge_transfer.aggregate_and_distill(
      self, server, outputs, rng
    )
    return FedGenServer(
      params=params,
      opt_state=opt_state,
      generator=generator,
      seen_counts=seen_counts,
      round=server.round + 1,
    )
