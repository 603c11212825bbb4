"""Tests of apfl_jax.asynchrony.clock (staleness weights, client speeds)."""

import numpy as np
import pytest
from test_simulator import async_config, write_trace

from apfl_jax.asynchrony import clock
from apfl_jax.core.errors import ConfigError


@pytest.mark.parametrize(
  'function,formula',
  [
    ('constant', lambda t: np.ones_like(t)),
    ('polynomial', lambda t: (t + 1.0) ** -0.5),
    ('hinge', lambda t: np.asarray([1.0 if x <= 4 else 1 / (0.5 * (x - 4) + 1) for x in t])),
  ],
)
def test_staleness_functions_match_their_formulas(function, formula):
  tau = np.asarray([0, 1, 2, 4, 5, 10, 30], np.float64)
  np.testing.assert_allclose(clock.staleness_weight(tau, function, 0.5, 4.0), formula(tau))
  assert clock.staleness_weight([7], 'hinge', 2.0, 3.0)[0] == pytest.approx(1 / 9)


@pytest.mark.parametrize(
  'text,message',
  [
    ('client,speed\n0,1\n1,1\n2,1\n3,1\n', 'header'),
    ('client,duration\n0,1\n1,1\n2,1\n', r'no row for client\(s\) \[3\]'),
    ('client,duration\n0,1\n1,1\n1,1\n2,1\n3,1\n', 'appears twice'),
    ('client,duration\n0,-1\n1,1\n2,1\n3,1\n', 'must be > 0'),
    ('client,duration\n0,fast\n1,1\n2,1\n3,1\n', 'line 2'),
    ('client,duration\n0,1,2\n1,1\n2,1\n3,1\n', 'line 2'),
    ('client,duration\n0,1\n1,1\n2,1\n4,1\n', r'client 4 is not in \[0, 4\)'),
  ],
)
def test_bad_speed_trace_names_the_flag(tmp_path, text, message):
  path = write_trace(tmp_path, text)
  with pytest.raises(ConfigError, match=f'--speed_trace.*{message}'):
    clock.read_speed_trace(path, 4)


def test_speed_trace_is_read_and_missing_file_names_the_flag(tmp_path):
  path = write_trace(tmp_path, 'client,duration\n1,2.5\n0,1\n\n')
  config = async_config(speed_distribution='trace', speed_trace=path, num_clients=2)
  np.testing.assert_array_equal(clock.step_durations(config, 2), [1.0, 2.5])
  with pytest.raises(ConfigError, match='--speed_trace'):
    clock.read_speed_trace(str(tmp_path / 'missing.csv'), 2)
