"""Experiment configuration: one frozen dataclass, its validation, and the absl flags.

Every field of `Config` is also a command-line flag of the same name, so flagfiles,
`experiments/main.py`, `experiments/compare.py` and tests all speak one vocabulary.
`Config.validate()` turns every invalid value into a `ConfigError` whose one-line
message names the flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from typing import Any

from absl import flags

from apfl_jax.data.datasets import DATASETS
from apfl_jax.embeddings import EMBEDDINGS
from apfl_jax.errors import ConfigError
from apfl_jax.generator import GENERATORS, NOISE_DISTRIBUTIONS
from apfl_jax.models import MODELS
from apfl_jax.models.conv import COMPUTE_DTYPES, CONV_IMPLS

ALGORITHMS = ('fedavg', 'local', 'fedgen', 'apfl', 'fedprox', 'ditto', 'fedrep', 'apfl_deng',
              'fedavg_ft')
SERVERS = ('sync', 'fedasync', 'fedbuff')
STALENESS_FUNCTIONS = ('constant', 'polynomial', 'hinge')
FEDBUFF_WEIGHTINGS = ('uniform', 'examples')
FEDGEN_REGULARIZERS = ('fedgen', 'pfllib')
SPEED_DISTRIBUTIONS = ('constant', 'lognormal', 'trace')
AVAILABILITIES = ('always', 'bernoulli', 'markov')
PARTITIONS = ('iid', 'dirichlet', 'pathological', 'monopoly')
TEST_SPLITS = ('proportional', 'pooled')
CLIENT_OPTIMIZERS = ('sgd', 'momentum', 'adam')
SERVER_OPTIMIZERS = ('sgd', 'momentum', 'adam')
FRIEND_INITS = ('local', 'global')
FRIEND_LABELS = ('client', 'all')
APFL_LOCAL_MODELS = ('persistent', 'from_global')
# Values an empty (or negative) flag takes for each generator-based algorithm: see
# `Config.validate`. AP-FL: the paper's image-space generator supervised by the global
# model; FedGen: its official feature-space generator taught by the round's clients.
ALGORITHM_DEFAULTS = {
    'apfl': {'generator': 'image', 'global_teacher_weight': 1.0, 'embedding': 'minilm'},
    'fedgen': {'generator': 'feature', 'global_teacher_weight': 0.0, 'embedding': 'onehot'},
}
OTHER_ALGORITHM_DEFAULTS = {'generator': 'feature', 'global_teacher_weight': 0.0}

# Fields that may change between a run and its resumption (they do not change the
# computation of the rounds already done).
RESUMABLE_FIELDS = ('num_rounds', 'workdir', 'checkpoint_every', 'data_dir', 'verbose',
                    'client_chunk_size', 'num_devices', 'distributed', 'scan_unroll')


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one experiment; each field is a flag of the same name."""
  # Data and partition.
  dataset: str = 'fashion_mnist'
  data_dir: str = ''
  num_clients: int = 20
  partition: str = 'dirichlet'
  dirichlet_alpha: float = 0.1
  classes_per_client: int = 2
  min_samples_per_client: int = 10
  monopoly_clients: int = 1
  monopoly_classes_per_client: int = 2
  test_split: str = 'proportional'
  client_train_fraction: float = 0.75
  # Model and training.
  model: str = 'cnn'
  conv_impl: str = 'auto'
  compute_dtype: str = 'float32'
  algorithm: str = 'fedavg'
  num_rounds: int = 50
  join_ratio: float = 1.0
  local_epochs: int = 1
  local_steps: int = 0
  max_client_buckets: int = 4
  scan_unroll: int = 1
  batch_size: int = 10
  learning_rate: float = 0.005
  client_optimizer: str = 'sgd'
  server_optimizer: str = 'sgd'
  server_learning_rate: float = 1.0
  # Asynchrony and dropout.
  dropout_clients: str = ''
  dropout_round: int = 0
  server: str = 'sync'
  buffer_size: int = 10
  concurrency: int = 0
  server_mixing: float = 0.6
  staleness_function: str = 'polynomial'
  staleness_exponent: float = 0.5
  staleness_hinge_b: float = 4.0
  max_staleness: int = 16
  fedbuff_weighting: str = 'uniform'
  fedasync_rho: float = 0.0
  speed_distribution: str = 'lognormal'
  speed_spread: float = 1.0
  speed_trace: str = ''
  availability: str = 'always'
  availability_p: float = 0.9
  availability_switch_p: float = 0.1
  dropout_time: float = -1.0
  rejoin_time: float = -1.0
  # Devices.
  client_chunk_size: int = 0
  num_devices: int = 1
  distributed: bool = False
  # Baselines.
  fedprox_mu: float = 0.01
  ditto_lambda: float = 0.1
  fedrep_head_epochs: int = 10
  apfl_deng_alpha: float = 0.5
  finetune_epochs: int = 1
  # Generator (FedGen, AP-FL).
  embedding: str = ''
  embedding_template: str = '{}'
  embedding_model: str = ''
  generator: str = ''
  noise_dim: int = 32
  noise_distribution: str = 'uniform'
  generator_hidden_dim: int = 256
  generator_steps: int = 50
  generator_batch_size: int = 64
  generator_learning_rate: float = 3e-4
  generator_ce_weight: float = 0.5
  global_teacher_weight: float = -1.0
  fedgen_alpha: float = 10.0
  fedgen_regularizer: str = 'fedgen'
  fedgen_beta: float = 10.0
  fedgen_generator_weight_decay: float = 1e-2
  fedgen_generator_lr_decay: float = 0.98
  # AP-FL friend models and interpolation.
  beta: float = 0.1
  synthetic_per_class: int = 600
  friend_batch_size: int = 64
  friend_learning_rate: float = 0.0
  friend_init: str = 'local'
  friend_labels: str = 'client'
  apfl_local_model: str = 'persistent'
  # Bookkeeping.
  seed: int = 0
  workdir: str = ''
  eval_every: int = 1
  checkpoint_every: int = 10
  verbose: bool = True

  def validate(self) -> 'Config':
    """Checks every field and fills in the algorithm's defaults.

    Flags whose default depends on the algorithm (`ALGORITHM_DEFAULTS`: --generator '',
    --global_teacher_weight -1, --embedding '') take that algorithm's value, and
    --friend_learning_rate 0 takes --learning_rate.

    Returns:
      The config with those defaults filled in (calls can be chained).

    Raises:
      ConfigError: naming the first invalid flag.
    """
    _choice('dataset', self.dataset, DATASETS)
    _choice('model', self.model, MODELS)
    _choice('algorithm', self.algorithm, ALGORITHMS)
    _choice('partition', self.partition, PARTITIONS)
    _choice('test_split', self.test_split, TEST_SPLITS)
    _positive('max_client_buckets', self.max_client_buckets)
    if not 0.0 < self.client_train_fraction < 1.0:
      raise ConfigError('--client_train_fraction must be in (0, 1), got '
                        f'{self.client_train_fraction}')
    _choice('conv_impl', self.conv_impl, CONV_IMPLS)
    _choice('compute_dtype', self.compute_dtype, COMPUTE_DTYPES)
    _positive('scan_unroll', self.scan_unroll)
    for name in ('client_chunk_size', 'num_devices'):
      if getattr(self, name) < 0:
        raise ConfigError(f'--{name} must be >= 0, got {getattr(self, name)}')
    _choice('client_optimizer', self.client_optimizer, CLIENT_OPTIMIZERS)
    _choice('server_optimizer', self.server_optimizer, SERVER_OPTIMIZERS)
    _choice('server', self.server, SERVERS)
    _choice('staleness_function', self.staleness_function, STALENESS_FUNCTIONS)
    _choice('fedbuff_weighting', self.fedbuff_weighting, FEDBUFF_WEIGHTINGS)
    _choice('fedgen_regularizer', self.fedgen_regularizer, FEDGEN_REGULARIZERS)
    _positive('fedrep_head_epochs', self.fedrep_head_epochs)
    if not 0.0 < self.fedgen_generator_lr_decay <= 1.0:
      raise ConfigError('--fedgen_generator_lr_decay must be in (0, 1], got '
                        f'{self.fedgen_generator_lr_decay}')
    _choice('speed_distribution', self.speed_distribution, SPEED_DISTRIBUTIONS)
    _choice('availability', self.availability, AVAILABILITIES)
    for name in ('buffer_size', 'max_staleness'):
      _positive(name, getattr(self, name))
    for name in ('concurrency', 'finetune_epochs'):
      if getattr(self, name) < 0:
        raise ConfigError(f'--{name} must be >= 0, got {getattr(self, name)}')
    for name in ('server_mixing', 'availability_p', 'availability_switch_p',
                 'apfl_deng_alpha'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f'--{name} must be in [0, 1], got {getattr(self, name)}')
    for name in ('staleness_exponent', 'staleness_hinge_b', 'speed_spread', 'fedprox_mu',
                 'ditto_lambda', 'fedasync_rho', 'fedgen_beta',
                 'fedgen_generator_weight_decay'):
      if not getattr(self, name) >= 0:  # also refuses NaN
        raise ConfigError(f'--{name} must be >= 0, got {getattr(self, name)}')
    if self.speed_distribution == 'trace' and not os.path.isfile(self.speed_trace):
      raise ConfigError(f'--speed_trace: file {self.speed_trace!r} not found '
                        '(needed by --speed_distribution=trace)')
    if self.generator:
      _choice('generator', self.generator, GENERATORS)
    _choice('noise_distribution', self.noise_distribution, NOISE_DISTRIBUTIONS)
    _choice('friend_init', self.friend_init, FRIEND_INITS)
    _choice('friend_labels', self.friend_labels, FRIEND_LABELS)
    _choice('apfl_local_model', self.apfl_local_model, APFL_LOCAL_MODELS)
    if self.embedding:
      _choice('embedding', self.embedding, EMBEDDINGS)
    for name in ('noise_dim', 'generator_hidden_dim', 'generator_steps',
                 'generator_batch_size', 'synthetic_per_class', 'friend_batch_size'):
      _positive(name, getattr(self, name))
    for name in ('generator_ce_weight', 'beta'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ConfigError(f'--{name} must be in [0, 1], got {getattr(self, name)}')
    if not (0.0 <= self.global_teacher_weight <= 1.0 or self.global_teacher_weight == -1.0):
      raise ConfigError('--global_teacher_weight must be in [0, 1] (or -1: the '
                        f"algorithm's default), got {self.global_teacher_weight}")
    if not self.generator_learning_rate > 0:
      raise ConfigError(
          f'--generator_learning_rate must be > 0, got {self.generator_learning_rate}')
    if not self.friend_learning_rate >= 0:
      raise ConfigError('--friend_learning_rate must be >= 0 (0: --learning_rate), got '
                        f'{self.friend_learning_rate}')
    if self.fedasync_rho > 0 and self.server != 'fedasync':
      raise ConfigError(f'--fedasync_rho={self.fedasync_rho} needs --server=fedasync, got '
                        f'--server={self.server}')
    if not self.fedgen_alpha >= 0:
      raise ConfigError(f'--fedgen_alpha must be >= 0, got {self.fedgen_alpha}')
    if self.dropout_round < 0:
      raise ConfigError(f'--dropout_round must be >= 0, got {self.dropout_round}')
    self.dropout_client_ids(monopoly_clients=())  # checks the syntax and the range
    _positive('num_clients', self.num_clients)
    if not 0 <= self.seed < 2**32:
      raise ConfigError(f'--seed must be in [0, 2^32), got {self.seed}')
    _positive('num_rounds', self.num_rounds)
    _positive('batch_size', self.batch_size)
    _positive('eval_every', self.eval_every)
    _positive('checkpoint_every', self.checkpoint_every)
    _positive('classes_per_client', self.classes_per_client)
    _positive('monopoly_classes_per_client', self.monopoly_classes_per_client)
    if not self.dirichlet_alpha > 0:
      raise ConfigError(f'--dirichlet_alpha must be > 0, got {self.dirichlet_alpha}')
    if not 0 < self.join_ratio <= 1:
      raise ConfigError(f'--join_ratio must be in (0, 1], got {self.join_ratio}')
    if not self.learning_rate > 0:
      raise ConfigError(f'--learning_rate must be > 0, got {self.learning_rate}')
    if not self.server_learning_rate > 0:
      raise ConfigError(
          f'--server_learning_rate must be > 0, got {self.server_learning_rate}')
    if self.local_epochs < 0 or self.local_steps < 0:
      raise ConfigError('--local_epochs and --local_steps must be >= 0, got '
                        f'{self.local_epochs} and {self.local_steps}')
    if (self.local_epochs > 0) == (self.local_steps > 0):
      raise ConfigError('exactly one of --local_epochs and --local_steps must be > 0 '
                        f'(got --local_epochs={self.local_epochs}, '
                        f'--local_steps={self.local_steps}); set the other to 0')
    if self.min_samples_per_client < 1:
      raise ConfigError('--min_samples_per_client must be >= 1, got '
                        f'{self.min_samples_per_client}')
    if self.partition == 'monopoly':
      if not 1 <= self.monopoly_clients < self.num_clients:
        raise ConfigError(
            f'--monopoly_clients must be in [1, --num_clients={self.num_clients}), '
            f'got {self.monopoly_clients}')
    return self.with_algorithm_defaults()

  def with_algorithm_defaults(self) -> 'Config':
    """The config with the algorithm-dependent defaults filled in."""
    defaults = ALGORITHM_DEFAULTS.get(self.algorithm, OTHER_ALGORITHM_DEFAULTS)
    changes = {}
    if not self.generator:
      changes['generator'] = defaults['generator']
    if self.global_teacher_weight < 0:
      changes['global_teacher_weight'] = defaults['global_teacher_weight']
    if not self.embedding and 'embedding' in defaults:
      changes['embedding'] = defaults['embedding']
    if self.friend_learning_rate == 0:
      changes['friend_learning_rate'] = self.learning_rate
    return self.replace(**changes)

  def dropout_client_ids(self, monopoly_clients: tuple[int, ...]) -> tuple[int, ...]:
    """The clients named by --dropout_clients ('' none, 'monopoly', or ids '3,7')."""
    spec = self.dropout_clients.strip()
    if not spec:
      return ()
    if spec == 'monopoly':
      if self.partition != 'monopoly':
        raise ConfigError('--dropout_clients=monopoly needs --partition=monopoly')
      return tuple(monopoly_clients)
    try:
      ids = tuple(sorted({int(x) for x in spec.split(',') if x.strip()}))
    except ValueError:
      raise ConfigError(f'--dropout_clients must be empty, "monopoly" or client ids like '
                        f'"3,7"; got {spec!r}') from None
    if not ids or min(ids) < 0 or max(ids) >= self.num_clients:
      raise ConfigError(f'--dropout_clients ids must be in [0, --num_clients='
                        f'{self.num_clients}), got {spec!r}')
    if len(ids) >= self.num_clients:
      raise ConfigError(f'--dropout_clients names {len(ids)} clients; at least one of '
                        f'--num_clients={self.num_clients} must stay active')
    return ids

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def replace(self, **changes: Any) -> 'Config':
    return dataclasses.replace(self, **changes)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f'--{name}: unknown value {value!r}; choose one of {", ".join(choices)}')


def _positive(name: str, value: int) -> None:
  if not value > 0:
    raise ConfigError(f'--{name} must be > 0, got {value}')


_HELP = {
    'dataset': 'Data set name.',
    'data_dir': 'tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).',
    'num_clients': 'Number of clients the data is split among.',
    'partition': 'How the training data is split among clients.',
    'dirichlet_alpha': 'Concentration of the per-class Dirichlet split (smaller = more skew).',
    'classes_per_client': 'Classes per client for --partition=pathological/monopoly.',
    'min_samples_per_client': 'Dirichlet split is redrawn until every client has this many.',
    'monopoly_clients': 'With --partition=monopoly: the last N clients own classes nobody else has.',
    'monopoly_classes_per_client': 'With --partition=monopoly: classes each monopoly client owns.',
    'max_client_buckets': ('Epoch mode: the cohort, sorted by data size, trains in up to N '
                           'vmapped groups, each scanning only as many steps as its largest '
                           'client needs (1: one lockstep scan; the training is the same up '
                           'to float rounding).'),
    'test_split': ('proportional: client test sets are drawn from the test split in proportion '
                   "to each client's label mix; pooled: train and test splits are pooled, "
                   "partitioned, and each client's share is split --client_train_fraction / "
                   'rest (PFLlib).'),
    'client_train_fraction': ("With --test_split=pooled: the training fraction of each "
                              "client's share."),
    'model': 'Model architecture.',
    'conv_impl': ('Convolution kernel: lax, im2col, patches or auto (im2col, the fastest '
                  'measured on CPU and on an H100 GPU; see models/conv.py).'),
    'compute_dtype': ('float32, or bfloat16: activations and conv patches in bf16 while '
                      'parameters and optimizer state stay float32.'),
    'scan_unroll': ('Local steps per iteration of the local-training loop (lax.scan unroll; '
                    'same results, fewer loop iterations for latency-bound steps).'),
    'client_chunk_size': ('Clients trained at once per device (a lax.map over chunks of N '
                          'clients, so large cohorts fit in memory); 0: the whole cohort in '
                          'one call. Same results up to float rounding.'),
    'num_devices': ('Devices the cohort is split over (a jax Mesh with a "clients" axis; the '
                    'server state and data are replicated); 0: every device, 1: no mesh.'),
    'distributed': ('Multi-host: call jax.distributed.initialize first (coordinator from '
                    'JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or '
                    'auto-detected on Cloud TPU pods and SLURM); --num_devices then counts '
                    'the devices of every host.'),
    'algorithm': 'Federated algorithm.',
    'num_rounds': 'Number of communication rounds.',
    'join_ratio': 'Fraction of clients that train in each round.',
    'local_epochs': 'Local epochs per round (0 to use --local_steps).',
    'local_steps': 'Fixed local steps per round (0 to use --local_epochs).',
    'batch_size': 'Client batch size.',
    'learning_rate': 'Client learning rate.',
    'client_optimizer': 'Client optimizer (re-initialised every round).',
    'server_optimizer': 'Server optimizer applied to the averaged update (sgd at lr 1 = FedAvg).',
    'server_learning_rate': 'Server learning rate.',
    'dropout_clients': 'Clients that stop sending updates after --dropout_round: empty, '
                       '"monopoly" (the monopoly clients) or ids such as "3,7".',
    'dropout_round': 'Dropout clients train in rounds 1..N only (0: never).',
    'server': 'Server mode: sync rounds, fedasync (mix each arriving update) or fedbuff '
              '(aggregate every --buffer_size arrivals).',
    'buffer_size': 'fedbuff: updates per server step (K).',
    'concurrency': 'Async: clients training at once (0 = as many as --join_ratio picks).',
    'server_mixing': 'fedasync: alpha in x <- (1 - alpha*s(tau)) x + alpha*s(tau) x_client.',
    'staleness_function': 'Staleness weight s(tau): constant, polynomial (tau+1)^-a or hinge.',
    'staleness_exponent': 'a of the polynomial and hinge staleness weights.',
    'staleness_hinge_b': 'b of the hinge staleness weight (1 while tau <= b).',
    'max_staleness': 'Async: server versions kept; an update staler than this is dropped.',
    'fedbuff_weighting': ('fedbuff: the buffer\'s mean update is (1/K) sum_k s(tau_k) delta_k '
                          '(uniform, FedBuff\'s Algorithm 1) or sum_k n_k s(tau_k) delta_k / '
                          'sum_k n_k (examples, FLSim\'s linear example weight).'),
    'fedasync_rho': ('fedasync: rho of the proximal term rho/2 ||x - x_tau||^2 added to the '
                     'local objective of the model sent to the server (0: none).'),
    'speed_distribution': 'Client compute time per local step: constant, lognormal or trace.',
    'speed_spread': 'sigma of the log-normal step durations (0 = equal speeds).',
    'speed_trace': 'CSV file with columns client,duration (--speed_distribution=trace).',
    'availability': 'Client availability: always, bernoulli (--availability_p) or markov.',
    'availability_p': 'Probability that a client is available (bernoulli; markov start).',
    'availability_switch_p': 'markov: probability of switching on<->off per time unit.',
    'dropout_time': 'Async: virtual time after which --dropout_clients stop (-1: use '
                    '--dropout_round).',
    'rejoin_time': 'Async: virtual time at which dropout clients come back (-1: never).',
    'fedprox_mu': 'FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2.',
    'ditto_lambda': 'Ditto: weight lambda of the personal model\'s pull to the global model.',
    'fedrep_head_epochs': ('FedRep: local epochs of the head phase before the --local_epochs '
                           'of the body (the paper: 10; PFLlib: 1).'),
    'apfl_deng_alpha': 'APFL (Deng et al.): initial mixing weight alpha of each client.',
    'finetune_epochs': 'FedAvg+FT: local epochs of fine-tuning before evaluation.',
    'embedding': 'Class-name embedding A(c) of the generator: minilm (offline), clip (needs '
                 'the hub) or onehot; empty = the algorithm\'s default (apfl: minilm, '
                 'fedgen: onehot).',
    'embedding_template': 'Text template of a class name, with one {} for the name.',
    'embedding_model': 'Hugging Face id or folder of the CLIP model (--embedding=clip).',
    'generator': 'Generator output: feature (the head\'s input, FedGen) or image (DCGAN); '
                 'empty = the algorithm\'s default (apfl: image, fedgen: feature).',
    'noise_dim': 'Width of the generator noise z.',
    'noise_distribution': 'Distribution of z: uniform U[0,1) (FedGen) or normal.',
    'generator_hidden_dim': 'Hidden width of the feature generator.',
    'generator_steps': 'Generator optimizer steps per round on the server.',
    'generator_batch_size': 'Generated samples per generator step.',
    'generator_learning_rate': 'Adam learning rate of the generator.',
    'generator_ce_weight': 'lambda in L_G = lambda*L_CE + (1-lambda)*L_div.',
    'global_teacher_weight': 'g: share of each label\'s teacher weight given to the global '
                             'model (the rest goes to the round\'s clients holding the label; '
                             'memorized labels nobody holds this round: the global model '
                             'alone); -1 = the algorithm\'s default (apfl: 1, fedgen: 0).',
    'fedgen_alpha': ('FedGen: weight of the cross-entropy on generated features in the '
                     'client loss (fedgen: alpha_0 of alpha_t = alpha_0 * 0.98^t).'),
    'fedgen_regularizer': ('FedGen client regulariser: fedgen (official code: alpha_t and '
                           'beta_t decay by 0.98 a round, latent KL term, none in round 0) or '
                           'pfllib (constant alpha, no KL term, from round 0).'),
    'fedgen_beta': ('FedGen (--fedgen_regularizer=fedgen): beta_0 of the latent KL term '
                    'beta_t KL(p(.|G(z, y)) || p(.|x)) on the real batch.'),
    'fedgen_generator_weight_decay': ('FedGen: L2 weight decay of the generator\'s Adam '
                                      '(official code: 1e-2; PFLlib: 0).'),
    'fedgen_generator_lr_decay': ('FedGen: the generator\'s learning rate is multiplied by '
                                  'this after every round (official code: 0.98; 1: none).'),
    'beta': 'AP-FL interpolation: personalized = beta*local + (1-beta)*friend.',
    'synthetic_per_class': 'AP-FL: generated samples per class for one friend-model epoch.',
    'friend_batch_size': 'AP-FL: friend-model batch size.',
    'friend_learning_rate': 'AP-FL: friend-model SGD learning rate (0: --learning_rate).',
    'friend_init': 'AP-FL: friend model starts from the local or the global model.',
    'friend_labels': 'AP-FL: friend trains on generated samples of the client\'s own label '
                     'mix (client) or of every class uniformly (all).',
    'apfl_local_model': 'AP-FL: persistent (each client keeps its local model and trains it '
                        'on its real data every round it joins, beside the update it sends) '
                        'or from_global (the local model is this round\'s update of the '
                        'global model, as FedAvg\'s clients compute it).',
    'seed': 'Seed of the partition, the initialisation and every random draw.',
    'workdir': 'Output folder (default: runs/<dataset>_<algorithm>_<time>); reuse to resume.',
    'eval_every': 'Evaluate every N rounds (and always after the last round).',
    'checkpoint_every': 'Save an orbax checkpoint every N rounds (and after the last).',
    'verbose': 'Print a progress line per round.',
}


def define_flags() -> None:
  """Defines one absl flag per `Config` field, with the field's default."""
  choices = {'dataset': DATASETS, 'model': MODELS, 'algorithm': ALGORITHMS,
             'partition': PARTITIONS, 'test_split': TEST_SPLITS, 'conv_impl': CONV_IMPLS,
             'compute_dtype': COMPUTE_DTYPES,
             'client_optimizer': CLIENT_OPTIMIZERS, 'server_optimizer': SERVER_OPTIMIZERS,
             'generator': GENERATORS, 'noise_distribution': NOISE_DISTRIBUTIONS,
             'friend_init': FRIEND_INITS, 'friend_labels': FRIEND_LABELS, 'server': SERVERS,
             'apfl_local_model': APFL_LOCAL_MODELS,
             'staleness_function': STALENESS_FUNCTIONS,
             'fedbuff_weighting': FEDBUFF_WEIGHTINGS, 'fedgen_regularizer': FEDGEN_REGULARIZERS,
             'speed_distribution': SPEED_DISTRIBUTIONS, 'availability': AVAILABILITIES}
  for field in dataclasses.fields(Config):
    name, default = field.name, field.default
    if name in flags.FLAGS:
      continue
    help_text = _HELP[name]
    if name in choices:
      help_text += f' One of: {", ".join(choices[name])}.'
    if isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
  """Builds a validated `Config` from parsed absl flags."""
  values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)}
  return Config(**values).validate()


def resolve_flagfile_args(argv: list[str], experiments_dir: str) -> list[str]:
  """Rewrites `--flagfile=NAME` to experiments/NAME when NAME is not in the cwd.

  Args:
    argv: command-line arguments.
    experiments_dir: folder that holds the project's flagfiles.

  Returns:
    The arguments with such flagfile paths rewritten.
  """
  resolved = []
  for arg in argv:
    if arg.startswith('--flagfile='):
      path = arg.split('=', 1)[1]
      candidate = os.path.join(experiments_dir, path)
      if not os.path.exists(path) and os.path.exists(candidate):
        arg = '--flagfile=' + candidate
      elif not os.path.exists(path):
        raise ConfigError(f'--flagfile: {path} not found (nor in {experiments_dir})')
    resolved.append(arg)
  return resolved


# `--help` groups: (title, first field of the group in `Config` order); a group runs up to
# the next group's first field, so a new field lands in the group of its neighbours.
HELP_GROUPS = (
    ('Data and partition', 'dataset'),
    ('Model and training', 'model'),
    ('Asynchrony and dropout', 'dropout_clients'),
    ('Baselines', 'fedprox_mu'),
    ('Generator (FedGen, AP-FL)', 'embedding'),
    ('AP-FL friend models and interpolation', 'beta'),
    ('Bookkeeping', 'seed'),
)


def format_help(program: str) -> str:
  """The `--help` text: every project flag with its default, grouped by component."""
  starts = {first: title for title, first in HELP_GROUPS}
  lines = [f'usage: {program} [--flagfile=NAME.flags] [--flag=value ...]',
           'A bare flagfile name not in the working directory is looked up in experiments/.']
  for field in dataclasses.fields(Config):
    if field.name in starts:
      lines += ['', f'{starts[field.name]}:']
    help_text = flags.FLAGS[field.name].help if field.name in flags.FLAGS else _HELP[field.name]
    lines.append(f'  --{field.name} (default {field.default!r})')
    lines += textwrap.wrap(help_text, 88, initial_indent='      ', subsequent_indent='      ')
  lines += ['', 'absl flags (logging, --flagfile, ...): --helpfull']
  return '\n'.join(lines)
