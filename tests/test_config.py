"""Tests of apfl_jax.config.config: components composed into one Config, flags and flagfiles."""

import collections
import dataclasses
import glob
import os
import re

from absl import flags
import pytest

from apfl_jax.config import config as config_lib
from apfl_jax.core import options
from apfl_jax.core.errors import ConfigError

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments')
FLAGFILES = sorted(
  glob.glob(os.path.join(EXPERIMENTS, '*.flags'))
  + glob.glob(os.path.join(EXPERIMENTS, '*', '*.flags'))
)


@pytest.fixture
def parsed_flags():
  """The global absl flags with the project's flags, unparsed before and after the test."""
  config_lib.define_flags()
  flags.FLAGS.unparse_flags()  # an earlier test (compare.run, main.run) may have parsed them
  yield flags.FLAGS
  flags.FLAGS.unparse_flags()


def test_every_field_belongs_to_exactly_one_component():
  owners = collections.Counter(
    f.name for component in config_lib.COMPONENTS for f in options.own_fields(component)
  )
  assert set(owners) == {f.name for f in dataclasses.fields(config_lib.Config)}
  assert max(owners.values()) == 1
  titles = [c.TITLE for c in config_lib.COMPONENTS]
  assert all(titles) and len(set(titles)) == len(titles)
  for field in dataclasses.fields(config_lib.Config):
    assert field.metadata['help'], field.name


@pytest.mark.parametrize('path', FLAGFILES, ids=os.path.basename)
def test_every_flagfile_parses_into_a_valid_config(parsed_flags, path):
  parsed_flags(['prog', f'--flagfile={path}'])
  config = config_lib.from_flags(parsed_flags)
  assert config.algorithm in config_lib.ALGORITHMS
  assert config.generator in ('feature', 'image')


def test_unvalidated_flags_take_the_defaults_of_the_algorithm_set_later(parsed_flags):
  # A flagfile for AP-FL; a comparison then runs FedGen with it (experiments/compare.py).
  parsed_flags(['prog', '--algorithm=apfl', '--learning_rate=0.05'])
  assert config_lib.from_flags(parsed_flags).generator == 'image'
  given = config_lib.from_flags(parsed_flags, validate=False)
  fedgen = given.replace(algorithm='fedgen').validate()
  assert (fedgen.generator, fedgen.embedding, fedgen.global_teacher_weight) == (
    'feature',
    'onehot',
    0.0,
  )
  apfl = given.validate()
  assert (apfl.generator, apfl.embedding, apfl.global_teacher_weight) == ('image', 'minilm', 1.0)
  assert apfl.apfl_friend_learning_rate == 0.05


def test_an_explicit_flag_beats_the_algorithm_default():
  config = config_lib.Config(algorithm='apfl', generator='feature', global_teacher_weight=0.5)
  config = config.validate()
  assert (config.generator, config.global_teacher_weight) == ('feature', 0.5)


@pytest.mark.parametrize(
  'changes, message',
  [
    ({'partition': 'random'}, "--partition: unknown value 'random'"),
    ({'generator': 'gan'}, "--generator: unknown value 'gan'"),
    ({'algorithm': 'fedfoo'}, "--algorithm: unknown value 'fedfoo'"),
    ({'fedprox_mu': -1.0}, '--fedprox_mu must be >= 0'),
    ({'apfl_beta': 1.5}, '--apfl_beta must be in [0, 1]'),
    ({'local_steps': 5}, 'exactly one of --local_epochs and --local_steps'),
    ({'fedasync_rho': 0.1}, '--fedasync_rho=0.1 needs --server=fedasync'),
    ({'seed': -1}, '--seed must be in [0, 2^32)'),
  ],
)
def test_each_component_checks_its_own_fields(changes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.Config(**changes).validate()


def test_from_dict_fills_fields_added_since_and_refuses_unknown_ones():
  values = dataclasses.asdict(config_lib.Config(num_clients=7))
  del values['fedrep_head_epochs']
  config = config_lib.Config.from_dict(values)
  assert config.num_clients == 7 and config.fedrep_head_epochs == 10
  with pytest.raises(ConfigError, match='unknown field.*no_such_flag'):
    config_lib.Config.from_dict({**values, 'no_such_flag': 1})


def test_a_run_made_before_a_behaviour_changing_flag_restores_as_it_ran():
  # Before --apfl_client_teachers, AP-FL's client teachers (g < 1) were the updates.
  values = dataclasses.asdict(config_lib.Config(algorithm='apfl'))
  assert values['apfl_client_teachers'] == 'local_model'
  assert config_lib.Config.from_dict(values) == config_lib.Config(algorithm='apfl')
  del values['apfl_client_teachers'], values['apfl_synthetic_budget']
  old = config_lib.Config.from_dict(values)
  assert (old.apfl_client_teachers, old.apfl_synthetic_budget) == ('update', 'all_classes')


def test_help_groups_flags_by_component(parsed_flags):
  text = config_lib.format_help('main.py')
  for component in config_lib.COMPONENTS:
    title = text.index(f'\n{component.TITLE}:\n')
    for field in options.own_fields(component):
      assert text.index(f'--{field.name} ', title) > title


def test_old_flag_names_of_a_config_json_are_read_as_todays():
  old = {'algorithm': 'apfl', 'beta': 0.01, 'friend_labels': 'all'}
  assert config_lib.upgrade_config_values(old) == {
    'algorithm': 'apfl',
    'apfl_beta': 0.01,
    'apfl_friend_labels': 'all',
  }
  assert config_lib.Config.from_dict(old).apfl_beta == 0.01
  with pytest.raises(ConfigError, match='both beta and its new name apfl_beta'):
    config_lib.upgrade_config_values({'beta': 0.1, 'apfl_beta': 0.2})
  with pytest.raises(ConfigError, match='expected a JSON object'):
    config_lib.upgrade_config_values([1, 2, 3])
