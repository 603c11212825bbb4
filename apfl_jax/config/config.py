"""Experiment configuration: every component's options composed into one frozen `Config`.

Each component declares its own options dataclass in its own module (`apfl_jax.core.options`):
the data and partition (`data.datasets.DataOptions`), the model (`models.ModelOptions`),
local training (`local_training.TrainingOptions`), the async clock
(`clock.ClockOptions`), devices (`cohort.DeviceOptions`), the generator
(`algorithms.knowledge_transfer.GeneratorOptions`), every registered algorithm
(`algorithms.registry`) and, here, the rounds and the bookkeeping. `Config` inherits them
all, so its fields stay one flat namespace: every field is a command-line flag of the same
name, and flagfiles, `experiments/main.py`, `experiments/compare.py` and the tests speak
one vocabulary. `Config.validate()` runs each component's checks and turns every invalid
value into a `ConfigError` whose one-line message names the flag.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import textwrap
from typing import TYPE_CHECKING, Any

from absl import flags

from apfl_jax import models
from apfl_jax.algorithms import registry
from apfl_jax.algorithms.generative import knowledge_transfer
from apfl_jax.asynchrony import clock
from apfl_jax.core import cohort, local_training, options
from apfl_jax.core.errors import ConfigError
from apfl_jax.core.local_training import OPTIMIZERS
from apfl_jax.data import datasets

# Fields that may change between a run and its resumption (they do not change the
# computation of the rounds already done).
RESUMABLE_FIELDS = (
  'num_rounds',
  'workdir',
  'checkpoint_every',
  'data_dir',
  'verbose',
  'client_chunk_size',
  'num_devices',
  'distributed',
  'distributed_timeout_s',
  'scan_unroll',
)


def _join_ratio(name: str, value: float) -> None:
  if not 0 < value <= 1:
    raise ConfigError(f'--{name} must be in (0, 1], got {value}')


def _seed(name: str, value: int) -> None:
  if not 0 <= value < 2**32:
    raise ConfigError(f'--{name} must be in [0, 2^32), got {value}')


@dataclasses.dataclass(frozen=True)
class RunOptions(options.Options):
  """The algorithm, the rounds, the server optimizer and dropout."""

  TITLE = 'Rounds and server'
  algorithm: str = options.option(
    'fedavg',
    'Federated algorithm.',
  )
  num_rounds: int = options.option(
    50,
    'Number of communication rounds.',
    check=options.positive,
  )
  join_ratio: float = options.option(
    1.0,
    'Fraction of clients that train in each round.',
    check=_join_ratio,
  )
  server_optimizer: str = options.option(
    'sgd',
    'Server optimizer applied to the averaged update (sgd at lr 1 = FedAvg).',
    choices=OPTIMIZERS,
  )
  server_learning_rate: float = options.option(
    1.0,
    'Server learning rate.',
    check=options.positive,
  )
  dropout_clients: str = options.option(
    '',
    'Clients that stop sending updates after --dropout_round: empty, "monopoly" (the '
    'monopoly clients) or ids such as "3,7".',
  )
  dropout_round: int = options.option(
    0,
    'Dropout clients train in rounds 1..N only (0: never).',
    check=options.non_negative,
  )

  def check(self, config: Any) -> None:
    options.check_choice('algorithm', self.algorithm, registry.names())
    config.dropout_client_ids(monopoly_clients=())  # checks the syntax and the range


@dataclasses.dataclass(frozen=True)
class BookkeepingOptions(options.Options):
  """Seed, output folder, evaluation and checkpoints."""

  TITLE = 'Bookkeeping'
  seed: int = options.option(
    0,
    'Seed of the partition, the initialisation and every random draw.',
    check=_seed,
  )
  workdir: str = options.option(
    '',
    'Output folder (default: runs/<dataset>_<algorithm>_<time>); reuse to resume.',
  )
  eval_every: int = options.option(
    1,
    'Evaluate every N rounds (and always after the last round).',
    check=options.positive,
  )
  checkpoint_every: int = options.option(
    10,
    'Save an orbax checkpoint every N rounds (and after the last).',
    check=options.positive,
  )
  verbose: bool = options.option(
    True,
    'Print a progress line per round.',
  )


class ConfigMethods:
  """Validation, defaults and serialisation of the composed `Config`."""

  if TYPE_CHECKING:

    def __getattr__(self, name: str) -> Any: ...

  def validate(self) -> Any:
    """Checks every field and fills in the defaults that depend on other flags.

    Flags whose default depends on the algorithm (--generator '', --global_teacher_weight
    -1, --embedding '') take the value the algorithm registered, and the components'
    `resolve` fill in the rest (e.g. --apfl_friend_learning_rate 0 takes --learning_rate).

    Returns:
      The config with those defaults filled in (calls can be chained).

    Raises:
      ConfigError: naming the first invalid flag.
    """
    for component in COMPONENTS:
      options.check_fields(component, self)
    return self.with_algorithm_defaults()

  def with_algorithm_defaults(self) -> Any:
    """The config with the algorithm-dependent defaults filled in."""
    defaults = registry.get(self.algorithm).defaults if self.algorithm in registry.names() else {}
    unset = {name: getattr(self, name) in ('', -1.0) for name in defaults}
    config = self.replace(**{name: v for name, v in defaults.items() if unset[name]})
    changes: dict[str, Any] = {}
    for component in COMPONENTS:
      resolve = vars(component).get('resolve')
      if resolve is not None:
        changes.update(resolve(config, config))
    return config.replace(**changes)

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
      raise ConfigError(
        f'--dropout_clients must be empty, "monopoly" or client ids like "3,7"; got {spec!r}'
      ) from None
    if not ids or min(ids) < 0 or max(ids) >= self.num_clients:
      raise ConfigError(
        f'--dropout_clients ids must be in [0, --num_clients={self.num_clients}), got {spec!r}'
      )
    if len(ids) >= self.num_clients:
      raise ConfigError(
        f'--dropout_clients names {len(ids)} clients; at least one of '
        f'--num_clients={self.num_clients} must stay active'
      )
    return ids

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)  # type: ignore[call-overload]

  def replace(self, **changes: Any) -> Any:
    return dataclasses.replace(self, **changes)  # type: ignore[type-var]

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> Any:
    """A Config from a config.json dict; fields it lacks (added since) take their defaults,
    or, for a flag whose default changed what a run does, `BEHAVIOUR_BEFORE_FLAG` (so a
    run made before it restores, resumes and re-scores as it ran).

    Raises:
      ConfigError: a key that is no flag of this version.
    """
    values = upgrade_config_values(values)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f'config.json: unknown field(s) {", ".join(unknown)}')
    return cls(**{**BEHAVIOUR_BEFORE_FLAG, **values})


# Flags renamed since runs were written: old config.json name -> today's flag.
RENAMED_FLAGS = {
  'beta': 'apfl_beta',
  'synthetic_per_class': 'apfl_synthetic_per_class',
  'synthetic_budget': 'apfl_synthetic_budget',
  'friend_batch_size': 'apfl_friend_batch_size',
  'friend_learning_rate': 'apfl_friend_learning_rate',
  'friend_init': 'apfl_friend_init',
  'friend_labels': 'apfl_friend_labels',
}


def upgrade_config_values(values: dict[str, Any]) -> dict[str, Any]:
  """A config.json dict with the names of `RENAMED_FLAGS` changed to today's.

  Raises:
    ConfigError: a dict holding both a flag's old and new name, or not a JSON object.
  """
  if not isinstance(values, dict):
    raise ConfigError(f'config.json: expected a JSON object of flags, got {type(values).__name__}')
  upgraded = dict(values)
  for old, new in RENAMED_FLAGS.items():
    if old in upgraded:
      if new in upgraded:
        raise ConfigError(f'config.json: holds both {old} and its new name {new}')
      upgraded[new] = upgraded.pop(old)
  return upgraded


# The value that reproduces what runs did before a flag existed, for flags whose default
# does something else.
BEHAVIOUR_BEFORE_FLAG = {'apfl_client_teachers': 'update'}

# Every component, in --help order; each registered algorithm's options come after the
# generator's.
COMPONENTS: tuple[type, ...] = (
  datasets.DataOptions,
  models.ModelOptions,
  local_training.TrainingOptions,
  RunOptions,
  clock.ClockOptions,
  cohort.DeviceOptions,
  knowledge_transfer.GeneratorOptions,
  *registry.option_classes(),
  BookkeepingOptions,
)
ALGORITHMS = registry.names()

if TYPE_CHECKING:

  class Config(
    ConfigMethods,
    BookkeepingOptions,
    knowledge_transfer.GeneratorOptions,
    cohort.DeviceOptions,
    clock.ClockOptions,
    RunOptions,
    local_training.TrainingOptions,
    models.ModelOptions,
    datasets.DataOptions,
  ):
    """All settings of one experiment (static view; algorithms' options are `Any`)."""

    def __init__(self, **values: Any) -> None: ...

    def __getattr__(self, name: str) -> Any: ...

else:
  # Dataclass fields are collected from the bases in reverse MRO order, so the bases are
  # listed last component first to keep `COMPONENTS` order.
  Config = dataclasses.make_dataclass(
    'Config',
    [],
    bases=(ConfigMethods, *reversed(COMPONENTS)),
    frozen=True,
    namespace={
      '__module__': __name__,
      '__doc__': 'All settings of one experiment; each field is a flag of the same name.',
    },
  )


def define_flags() -> None:
  """Defines one absl flag per `Config` field, with the field's default and help."""
  for field in dataclasses.fields(Config):
    name, default = field.name, field.default
    if name in flags.FLAGS:
      continue
    help_text = field.metadata['help']
    choices = field.metadata['choices']
    if name == 'algorithm':
      choices = registry.names()
    if choices:
      help_text += f' One of: {", ".join(choices)}.'
    if isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, str(default), help_text)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS, validate: bool = True) -> Config:
  """Builds a `Config` from parsed absl flags.

  Args:
    flag_values: the parsed flags.
    validate: check it and fill in the defaults that depend on other flags; without, the
      flags as given (to change e.g. --algorithm before the defaults are filled in).

  Returns:
    The config.
  """
  values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)}
  config = Config(**values)
  return config.validate() if validate else config


# The checkout's experiments/ folder (flagfiles grouped by study in its sub-folders).
EXPERIMENTS_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'experiments'
)


def find_flagfile(name: str, experiments_dir: str = EXPERIMENTS_DIR) -> str | None:
  """experiments/NAME, else the one experiments/<study>/NAME (None when there is none).

  Raises:
    ConfigError: naming --flagfile when several study folders hold NAME.
  """
  direct = os.path.join(experiments_dir, name)
  if os.path.isfile(direct):
    return direct
  found = sorted(glob.glob(os.path.join(glob.escape(experiments_dir), '*', name)))
  if len(found) > 1:
    raise ConfigError(f'--flagfile: {name} is in several study folders: {", ".join(found)}')
  return found[0] if found else None


def resolve_flagfile_args(argv: list[str], experiments_dir: str = EXPERIMENTS_DIR) -> list[str]:
  """Rewrites `--flagfile=NAME` to experiments/[<study>/]NAME when NAME is not in the cwd.

  Args:
    argv: command-line arguments.
    experiments_dir: folder that holds the project's flagfiles (directly or one study
      folder down).

  Returns:
    The arguments with such flagfile paths rewritten.

  Raises:
    ConfigError: naming --flagfile when it is found nowhere.
  """
  resolved = []
  for arg in argv:
    if arg.startswith('--flagfile='):
      path = arg.split('=', 1)[1]
      if not os.path.exists(path):
        candidate = find_flagfile(path, experiments_dir)
        if candidate is None:
          raise ConfigError(
            f'--flagfile: {path} not found (nor in {experiments_dir} or its studies)'
          )
        arg = '--flagfile=' + candidate
    resolved.append(arg)
  return resolved


def format_help(program: str) -> str:
  """The `--help` text: every project flag with its default, grouped by component."""
  lines = [
    f'usage: {program} [--flagfile=NAME.flags] [--flag=value ...]',
    'A bare flagfile name not in the working directory is looked up in experiments/.',
  ]
  for component in COMPONENTS:
    lines += ['', f'{component.TITLE}:']  # type: ignore[attr-defined]
    for field in options.own_fields(component):
      help_text = (
        flags.FLAGS[field.name].help if field.name in flags.FLAGS else field.metadata['help']
      )
      lines.append(f'  --{field.name} (default {field.default!r})')
      lines += textwrap.wrap(help_text, 88, initial_indent='      ', subsequent_indent='      ')
  lines += ['', 'absl flags (logging, --flagfile, ...): --helpfull']
  return '\n'.join(lines)
