"""AP-FL: personalized FL through global memorization (arXiv 2503.00407).

Per round:
  1. each client of the cohort trains on its real data, in one vmapped call:
     * the global model, whose update it sends (with its label counts) to the server;
     * its own persistent local model theta_local (`--apfl_local_model=persistent`):
       started from the global model at the client's first participation and then kept
       on the client, trained further every round it joins, never replaced by the
       global model. Both trainings see the same batches (one batch plan). theta_local
       trains with `personal_optimizer`, so FedAsync's proximal term (`--fedasync_rho`,
       a wrapper of `client_optimizer`) pulls only the global model's update.
     With `--apfl_local_model=from_global` the local model is instead the round's update
     of the global model (FedAvg's local model), and only one training runs;
  2. the server averages the updates (FedAvg), adds the label counts to its memory
     (`seen_counts`, every class learned so far) and trains the semantic generator
     G(z, A(c)) by data-free knowledge transfer (`knowledge_transfer`): by default the
     global model is the teacher ("under global model supervision",
     `--global_teacher_weight=1`), on labels drawn from the memory. With g < 1 the
     client models of the paper's weighted cross-entropy teach too: by default the
     clients' local models, which they then send beside their updates
     (`--apfl_client_teachers=local_model`), or the updates themselves (`update`,
     FedGen's teachers). A(c) is a text
     embedding of the class name, so G can also be sampled for classes no client ever
     held (zero-shot, e.g. the monopoly classes of dropout clients);
  3. each client k trains a friend model theta_friend on generated samples only and
     personalizes by decoupled interpolation
        theta_p = beta * theta_local + (1 - beta) * theta_friend.

Friend models are a pure function of (local model, generator, key), so they are computed
when personalized models are needed (`personalized_params`, inside the jitted
evaluation), for every client through the client map (`Algorithm.client_map`): the
result is what each client holds after downloading the current generator. A client that
never trained (a dropout client with --dropout_round=0) takes the global model as its local model.

With the default `--generator=image` the generator makes images and the whole friend
model trains on them, so theta_local and theta_friend differ in every layer. With
`--generator=feature` (FedGen's head-input generator) the friend keeps the local body and
trains only its head on generated features.

`unseen_class_params` is the zero-shot probe: the global model whose friend training
covered every class uniformly, scored on the classes no active client holds. With
`--apfl_unseen_control` a second generator, conditioned on one-hot class codes instead of
A(c), trains beside the first on the same teachers, and `unseen_class_control_params` is
the same probe on its samples: the control without semantic information.
`label_prior_free_params` gives dropout clients' personalized models with friends trained
on every class uniformly, i.e. without the knowledge of the client's own label set that
`--apfl_friend_labels=client` uses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from apfl_jax.algorithms import base, registry
from apfl_jax.algorithms.fedavg import FedAvg
from apfl_jax.algorithms.generative import generator as generator_lib
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.core import local_training, options
from apfl_jax.core.errors import ConfigError

FRIEND_INITS = ('local', 'global')
FRIEND_LABELS = ('client', 'present', 'all')
LOCAL_MODELS = ('persistent', 'from_global')
CLIENT_TEACHERS = ('local_model', 'update')
SYNTHETIC_BUDGETS = ('all_classes', 'friend_classes')


def _friend_learning_rate(name: str, value: float) -> None:
  if not value >= 0:
    raise ConfigError(f'--{name} must be >= 0 (0: --learning_rate), got {value}')


@dataclasses.dataclass(frozen=True)
class APFLOptions(options.Options):
  """AP-FL's flags: friend models and interpolation (the generator's are
  `knowledge_transfer.GeneratorOptions`)."""

  TITLE = 'AP-FL friend models and interpolation'
  apfl_beta: float = options.option(
    0.1,
    'AP-FL interpolation: personalized = beta*local + (1-beta)*friend.',
    check=options.unit_interval,
  )
  apfl_synthetic_per_class: int = options.option(
    600, 'AP-FL: generated samples per class for one friend-model epoch.', check=options.positive
  )
  apfl_synthetic_budget: str = options.option(
    'all_classes',
    'AP-FL: a friend epoch has --apfl_synthetic_per_class samples for each class the friend '
    'trains on (friend_classes: a client with 2 classes gets 2x600) or for every class of '
    'the data set (all_classes), whatever its label mix.',
    choices=SYNTHETIC_BUDGETS,
  )
  apfl_friend_batch_size: int = options.option(
    64, 'AP-FL: friend-model batch size.', check=options.positive
  )
  apfl_friend_learning_rate: float = options.option(
    0.0,
    'AP-FL: friend-model SGD learning rate (0: --learning_rate).',
    check=_friend_learning_rate,
  )
  apfl_friend_init: str = options.option(
    'local', 'AP-FL: friend model starts from the local or the global model.', choices=FRIEND_INITS
  )
  apfl_friend_labels: str = options.option(
    'client',
    "AP-FL: friend trains on generated samples of the client's own label mix (client), of "
    "the client's classes uniformly (present) or of every class uniformly (all).",
    choices=FRIEND_LABELS,
  )
  apfl_local_model: str = options.option(
    'persistent',
    'AP-FL: persistent (each client keeps its local model and trains it on its real data '
    'every round it joins, beside the update it sends) or from_global (the local model is '
    "this round's update of the global model, as FedAvg's clients compute it).",
    choices=LOCAL_MODELS,
  )
  apfl_client_teachers: str = options.option(
    'local_model',
    'AP-FL, with --global_teacher_weight < 1: the client models that teach the generator '
    "are the clients' local models (local_model: the paper's theta_k, sent beside the "
    "update) or this round's updates of the global model (update: FedGen's teachers).",
    choices=CLIENT_TEACHERS,
  )

  apfl_unseen_control: bool = options.option(
    False,
    'AP-FL: also train a control generator conditioned on one-hot class codes (no '
    'semantic information) beside the first, on the same teachers, and report its '
    'zero-shot probe as unseen_class_acc_onehot_control (costs a second generator '
    'training per round and a second probe per evaluation).',
  )

  def resolve(self, config: Any) -> dict[str, Any]:
    if self.apfl_friend_learning_rate == 0:
      return {'apfl_friend_learning_rate': config.learning_rate}
    return {}


@flax.struct.dataclass
class APFLServer:
  """Global model, its optimizer state, the generator, the label memory and the round.

  Attributes:
    seen_counts: float [num_classes] labels the server has learned from, summed over
      every round: the classes the generator memorizes.
    control_generator: with `--apfl_unseen_control`, the one-hot-conditioned generator
      of the zero-shot probe's control (None, no pytree leaves, without).
  """

  params: Any
  opt_state: Any
  generator: generator_lib.GeneratorState
  seen_counts: jax.Array
  round: jax.Array
  control_generator: generator_lib.GeneratorState | None = None


@flax.struct.dataclass
class APFLClient:
  """Per-client local model (stacked) and whether the client has trained yet."""

  local_params: Any
  has_local: jax.Array


@dataclasses.dataclass(frozen=True)
class FriendSetup:
  """Static settings of friend-model training.

  Attributes:
    steps: optimizer steps of a friend that trains on every class,
      ceil(apfl_synthetic_per_class * num_classes / batch_size); every friend's scan is this
      long.
    batch_size: generated samples per step.
    learning_rate: SGD learning rate.
    init: 'local' or 'global': where a friend model starts.
    labels: 'client' (the client's own label mix), 'present' (the client's classes
      uniformly) or 'all' (every class uniformly).
    beta: interpolation weight of the local model.
    samples_per_trained_class: 0: every friend takes `steps` steps; n > 0: a friend
      training on C classes (labels of nonzero weight) takes
      min(steps, ceil(n * C / batch_size)) steps and its later steps are masked
      (`--apfl_synthetic_budget=friend_classes`).
  """

  steps: int
  batch_size: int
  learning_rate: float
  init: str
  labels: str
  beta: float
  samples_per_trained_class: int = 0

  @classmethod
  def from_config(cls, config: Any, num_classes: int) -> 'FriendSetup':
    return cls(
      steps=math.ceil(
        config.apfl_synthetic_per_class * num_classes / config.apfl_friend_batch_size
      ),
      batch_size=config.apfl_friend_batch_size,
      learning_rate=config.apfl_friend_learning_rate or config.learning_rate,
      init=config.apfl_friend_init,
      labels=config.apfl_friend_labels,
      beta=config.apfl_beta,
      samples_per_trained_class=(
        config.apfl_synthetic_per_class if config.apfl_synthetic_budget == 'friend_classes' else 0
      ),
    )


def interpolate(local: Any, friend: Any, beta: float) -> Any:
  """beta * local + (1 - beta) * friend, leaf by leaf."""
  return jax.tree.map(lambda loc, fr: beta * loc + (1.0 - beta) * fr, local, friend)


def _stack(*trees: Any) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@registry.register(
  'apfl',
  options=APFLOptions,
  defaults={'generator': 'image', 'global_teacher_weight': 1.0, 'embedding': 'minilm'},
)
class APFL(FedAvg):
  """AP-FL with a semantic generator, friend models and decoupled interpolation."""

  personalized_axis = 0

  @classmethod
  def from_config(cls, config: Any, context: registry.BuildContext) -> APFL:
    """AP-FL with the generator, friends and local models the flags describe."""
    return cls(
      *context.fedavg_args(),
      knowledge_transfer.setup_from_config(config, context.model, context.dataset),
      FriendSetup.from_config(config, context.dataset.num_classes),
      context.partition.train_counts,
      config.seed,
      config.apfl_local_model,
      config.apfl_client_teachers,
      control_setup=(
        knowledge_transfer.create_setup(
          config,
          context.model,
          context.dataset,
          np.eye(context.dataset.num_classes, dtype=np.float32),
        )
        if config.apfl_unseen_control
        else None
      ),
    )

  def __init__(
    self,
    model: Any,
    image_shape: tuple[int, ...],
    schedule: local_training.Schedule,
    client_optimizer: local_training.OptimizerLike,
    server_optimizer: local_training.OptimizerLike,
    setup: knowledge_transfer.GeneratorSetup,
    friend: FriendSetup,
    label_counts: np.ndarray,
    seed: int,
    local_model: str = 'persistent',
    client_teachers: str = 'local_model',
    control_setup: knowledge_transfer.GeneratorSetup | None = None,
  ):
    super().__init__(model, image_shape, schedule, client_optimizer, server_optimizer)
    # theta_local's own handle on the optimizer, so that a wrapper of the global copy's
    # `client_optimizer` (FedAsync's proximal term) leaves the local model alone.
    self.personal_optimizer = client_optimizer
    self.setup = setup
    # The zero-shot probe's control: `setup` with one-hot class codes (or None).
    self.control_setup = control_setup
    self.friend = friend
    self.label_counts = np.asarray(label_counts, np.float32)
    self.num_clients, self.num_classes = self.label_counts.shape
    self.seed = seed
    if local_model not in LOCAL_MODELS:
      raise ValueError(f'unknown local_model {local_model!r}')
    self.local_model = local_model
    if client_teachers not in CLIENT_TEACHERS:
      raise ValueError(f'unknown client_teachers {client_teachers!r}')
    # The server needs the local models only when clients teach and they differ from the
    # updates.
    self.sends_local_model = (
      setup.global_teacher_weight < 1
      and client_teachers == 'local_model'
      and local_model == 'persistent'
    )

  def init(self, rng: jax.Array) -> base.AlgorithmState:
    model_rng, generator_rng = jax.random.split(rng)
    fedavg = super().init(model_rng)
    params = fedavg.server.params
    generator = generator_lib.init_generator(
      self.setup.generator, self.setup.optimizer, generator_rng
    )
    server = APFLServer(
      params=params,
      opt_state=fedavg.server.opt_state,
      generator=generator,
      seen_counts=jnp.zeros((self.num_classes,), jnp.float32),
      round=jnp.zeros((), jnp.int32),
      control_generator=(
        None
        if self.control_setup is None
        else generator_lib.init_generator(
          self.control_setup.generator,
          self.control_setup.optimizer,
          jax.random.fold_in(generator_rng, 1),
        )
      ),
    )
    clients = APFLClient(
      local_params=jax.tree.map(
        lambda x: jnp.broadcast_to(x, (self.num_clients, *x.shape)), params
      ),
      has_local=jnp.zeros((self.num_clients,), bool),
    )
    return base.AlgorithmState(server=server, clients=clients)

  def client_update(self, server, client, index_row, count, rng, data):
    def train(start, optimizer):
      return local_training.train_client(
        start, self.loss_fn, optimizer, data, index_row, count, rng, self.schedule
      )

    if self.local_model == 'persistent':
      own = jax.tree.map(
        lambda loc, glob: jnp.where(client.has_local, loc, glob), client.local_params, server.params
      )
      if self.personal_optimizer is self.client_optimizer:
        # One optimizer: both trainings in one vmapped call.
        trained, losses = jax.vmap(lambda p: train(p, self.client_optimizer))(
          _stack(server.params, own)
        )
        update = jax.tree.map(lambda x: x[0], trained)
        local = jax.tree.map(lambda x: x[1], trained)
        loss = losses[0]
      else:
        update, loss = train(server.params, self.client_optimizer)
        local, _ = train(own, self.personal_optimizer)
    else:
      update, loss = train(server.params, self.client_optimizer)
      local = update
    output = knowledge_transfer.labelled_output(
      update, server.params, loss, data, index_row, count, self.num_classes
    )
    output = output.replace(finite=output.finite & base.all_finite(local))
    if self.sends_local_model:
      output = output.replace(update={**output.update, 'local_model': local})
    return APFLClient(local_params=local, has_local=jnp.asarray(True)), output

  def server_update(self, server, outputs, rng):
    teachers = outputs.update['local_model'] if self.sends_local_model else None
    params, opt_state, generator, seen_counts = knowledge_transfer.aggregate_and_distill(
      self, server, outputs, rng, teachers
    )
    control = server.control_generator
    if self.control_setup is not None:
      # The control learns from the same teachers and labels, with its own key.
      control, _ = knowledge_transfer.train_on_teachers(
        self.control_setup,
        self.model,
        control,
        knowledge_transfer.round_teachers(self.setup, server, outputs.update['delta'], teachers),
        outputs.update['label_counts'],
        params,
        seen_counts,
        jax.random.fold_in(rng, 1),
      )
    return APFLServer(
      params=params,
      opt_state=opt_state,
      generator=generator,
      seen_counts=seen_counts,
      round=server.round + 1,
      control_generator=control,
    )

  def train_friend(
    self, server: APFLServer, init_params: Any, label_probs: jax.Array, rng: jax.Array
  ) -> Any:
    """Trains one friend model on generated samples only.

    Args:
      server: the server state (generator and its label memory).
      init_params: the friend's starting parameters.
      label_probs: [num_classes] sampling weights of the generated labels.
      rng: key.

    Returns:
      The friend's parameters.
    """
    friend = self.friend
    num_steps: Any = friend.steps
    if friend.samples_per_trained_class:
      trained_classes = jnp.sum(label_probs > 0)
      needed = -(-friend.samples_per_trained_class * trained_classes // friend.batch_size)
      num_steps = jnp.minimum(needed, friend.steps)
    keys = jax.random.split(rng, friend.steps)
    return self.friend_steps(server, init_params, label_probs, keys, num_steps)

  def friend_steps(
    self,
    server: APFLServer,
    init_params: Any,
    label_probs: jax.Array,
    keys: jax.Array,
    num_steps: Any,
  ) -> Any:
    """SGD on generated samples, one step per key; steps from `num_steps` on are masked.

    Args:
      server: the server state (generator and its label memory).
      init_params: the friend's starting parameters.
      label_probs: [num_classes] sampling weights of the generated labels.
      keys: [S] one key per scanned step.
      num_steps: int (or int scalar array) <= S, the steps that update the friend.

    Returns:
      The friend's parameters.
    """
    setup, model, friend = self.setup, self.model, self.friend
    optimizer = optax.sgd(friend.learning_rate)
    feature_space = setup.kind == 'feature'
    trainable = init_params['head'] if feature_space else init_params
    memory = jnp.log(knowledge_transfer.memory_label_probs(server.seen_counts))

    def loss_fn(weights, samples, labels):
      params = {'body': init_params['body'], 'head': weights} if feature_space else weights
      logits = knowledge_transfer.sample_logits(model, setup.kind, params, samples)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def step(carry, inputs):
      key, index = inputs
      weights, opt_state = carry
      label_key, reference_key, sample_key = jax.random.split(key, 3)
      labels = jax.random.categorical(label_key, jnp.log(label_probs), shape=(friend.batch_size,))
      # BatchNorm statistics come from a batch drawn like the generator's training labels.
      reference = jax.random.categorical(reference_key, memory, shape=(setup.batch_size,))
      samples = jax.lax.stop_gradient(
        generator_lib.generate(
          setup.generator,
          server.generator.params,
          sample_key,
          labels,
          setup.noise_dim,
          setup.noise_distribution,
          reference_labels=reference,
        )
      )
      grads = jax.grad(loss_fn)(weights, samples, labels)
      updates, new_opt_state = optimizer.update(grads, opt_state, weights)
      stepped = (optax.apply_updates(weights, updates), new_opt_state)
      # Padded steps are masked, not branched on: every friend scans `keys`.
      return jax.tree.map(
        lambda new, old: jnp.where(index < num_steps, new, old), stepped, carry
      ), None

    (trained, _), _ = jax.lax.scan(
      step, (trainable, optimizer.init(trainable)), (keys, jnp.arange(keys.shape[0]))
    )
    return {'body': init_params['body'], 'head': trained} if feature_space else trained

  def friend_keys(self, server: APFLServer) -> jax.Array:
    """Keys of this server version's friend training: one per client, then the probe's."""
    key = jax.random.fold_in(jax.random.key(self.seed + 1), server.round)
    return jax.random.split(key, self.num_clients + 1)

  def local_models(self, state: base.AlgorithmState) -> Any:
    """Each client's local model; the global model for clients that never trained."""
    server, clients = state.server, state.clients
    return jax.tree.map(
      lambda local, g: jnp.where(clients.has_local.reshape((-1,) + (1,) * g.ndim), local, g[None]),
      clients.local_params,
      server.params,
    )

  def friend_models(
    self, state: base.AlgorithmState, client_ids: jax.Array, label_probs: jax.Array
  ) -> Any:
    """Friend models of some clients, trained through the client map (one vmapped call,
    chunks of clients or a mesh).

    Args:
      state: the federation's state.
      client_ids: int [N] the clients.
      label_probs: [N, num_classes] each friend's generated-label weights.

    Returns:
      The friends' parameters, stacked [N, ...].
    """
    server = state.server
    if self.friend.init == 'local':
      start = base.gather_clients(self.local_models(state), client_ids)
    else:
      start = jax.tree.map(
        lambda g: jnp.broadcast_to(g, (client_ids.shape[0], *g.shape)), server.params
      )
    keys = self.friend_keys(server)[client_ids]
    return self.client_map(self.train_friend, (None, 0, 0, 0), server, start, label_probs, keys)

  def client_label_probs(self) -> jax.Array:
    """[num_clients, num_classes] generated-label weights of each client's friend model."""
    if self.friend.labels == 'client':
      return jnp.asarray(self.label_counts)
    if self.friend.labels == 'present':
      return jnp.asarray(self.label_counts > 0, jnp.float32)
    return jnp.ones((self.num_clients, self.num_classes), jnp.float32)

  def personalization_parts(
    self, state: base.AlgorithmState, client_ids: jax.Array, label_probs: jax.Array
  ) -> tuple[Any, Any]:
    """The two models the clients interpolate, before beta weighs them.

    Args:
      state: the federation's state.
      client_ids: int [N] the clients.
      label_probs: [N, num_classes] each friend's generated-label weights.

    Returns:
      (local models, friend models), each stacked [N, ...].
    """
    local = base.gather_clients(self.local_models(state), client_ids)
    return local, self.friend_models(state, client_ids, label_probs)

  def _personalize(
    self, state: base.AlgorithmState, client_ids: jax.Array, label_probs: jax.Array
  ) -> Any:
    local, friends = self.personalization_parts(state, client_ids, label_probs)
    return interpolate(local, friends, self.friend.beta)

  def personalized_params(self, state, data):
    return self._personalize(state, jnp.arange(self.num_clients), self.client_label_probs())

  def label_prior_free_params(self, state, data, client_ids):
    """Personalized models of `client_ids` whose friends train on every class uniformly."""
    label_probs = jnp.ones((client_ids.shape[0], self.num_classes), jnp.float32)
    return self._personalize(state, client_ids, label_probs)

  def unseen_class_params(self, state, data):
    server = state.server
    return self.train_friend(
      server,
      server.params,
      jnp.ones((self.num_classes,), jnp.float32),
      self.friend_keys(server)[self.num_clients],
    )

  def unseen_class_control_params(self, state, data):
    """The zero-shot probe trained, with the same keys, on the one-hot control generator."""
    if self.control_setup is None:
      return None
    control = copy.copy(self)
    control.setup = self.control_setup
    server = state.server.replace(generator=state.server.control_generator)
    return control.unseen_class_params(state.replace(server=server), data)
