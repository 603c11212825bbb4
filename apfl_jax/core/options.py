"""Options: the small frozen dataclasses each component declares its flags with.

A component (the data partition, local training, the async clock, the generator, each
algorithm, ...) declares its settings as a frozen dataclass deriving from `Options`, in its
own module, one `option(...)` per field: the default, the help text, the allowed values and
a check. `apfl_jax.config.config` composes every component into one `Config`; each field becomes a
command-line flag of the same name, so flagfiles speak one flat vocabulary.

    @dataclasses.dataclass(frozen=True)
    class FedProxOptions(options.Options):
      TITLE = 'FedProx'
      fedprox_mu: float = options.option(0.01, 'Weight mu of the proximal term.',
                                         check=options.non_negative)

`Options.check` holds the checks that involve several fields, and `Options.resolve` the
defaults that depend on other fields (e.g. a learning rate of 0 meaning another flag's).
Both receive the whole config, so they may read any component's fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Sequence

from apfl_jax.core.errors import ConfigError

Check = Callable[[str, Any], None]


def option(
  default: Any, help: str, *, choices: Sequence[str] = (), check: Check | None = None
) -> Any:
  """A dataclass field that is also a flag.

  Args:
    default: the flag's default (its type sets the flag's type: bool, int, float or str).
    help: the flag's help text.
    choices: allowed values of a string flag (the empty string stays allowed only when it is
      the default, meaning "the algorithm's default").
    check: `check(name, value)` raising `ConfigError` for a bad value.

  Returns:
    A `dataclasses.field`.
  """
  return dataclasses.field(
    default=default, metadata={'help': help, 'choices': tuple(choices), 'check': check}
  )


def positive(name: str, value: Any) -> None:
  if not value > 0:
    raise ConfigError(f'--{name} must be > 0, got {value}')


def non_negative(name: str, value: Any) -> None:
  if not value >= 0:  # also refuses NaN
    raise ConfigError(f'--{name} must be >= 0, got {value}')


def unit_interval(name: str, value: Any) -> None:
  if not 0.0 <= value <= 1.0:
    raise ConfigError(f'--{name} must be in [0, 1], got {value}')


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ConfigError(f'--{name}: unknown value {value!r}; choose one of {", ".join(choices)}')


class Options:
  """Base of every component's options dataclass."""

  # Heading of the component's flags in `--help`.
  TITLE: ClassVar[str] = ''

  def check(self, config: Any) -> None:
    """Checks that involve several fields; raises `ConfigError`.

    Args:
      config: the whole config (an instance of this class and of every other component).
    """
    del config

  def resolve(self, config: Any) -> dict[str, Any]:
    """Values of fields whose default depends on other fields.

    Args:
      config: the whole config.

    Returns:
      {field: value} to replace.
    """
    del config
    return {}


def own_fields(cls: type) -> list[dataclasses.Field]:
  """The fields a component class declares itself (not those it inherits)."""
  names = set(vars(cls).get('__annotations__', {}))
  return [f for f in dataclasses.fields(cls) if f.name in names]


def check_fields(cls: type, config: Any) -> None:
  """Runs the choices and per-field checks of the fields `cls` declares, then `cls.check`.

  Args:
    cls: a component class.
    config: the whole config.

  Raises:
    ConfigError: naming the first invalid flag.
  """
  for field in own_fields(cls):
    value = getattr(config, field.name)
    choices = field.metadata.get('choices', ())
    if choices and not (value == '' and field.default == ''):
      check_choice(field.name, value, choices)
    check = field.metadata.get('check')
    if check is not None:
      check(field.name, value)
  own_check = vars(cls).get('check')
  if own_check is not None:
    own_check(config, config)
