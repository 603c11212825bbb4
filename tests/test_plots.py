"""Tests of apfl_jax.plots on hand-made runs (no training)."""

import csv
import math
import os

import numpy as np
import pytest

from apfl_jax import plots


def make_run(algorithm, seed, final, best=None, setting='', error='', **extra):
  """A finished run whose summary has `final` (and `best`) personalized accuracies."""
  if error:
    return plots.Run(algorithm, setting, seed, f'/runs/{algorithm}/seed{seed}', {}, [],
                     error=error)
  summary = {'final_personalized_acc': final, 'best_personalized_acc': best or final,
             'best_personalized_acc_round': 2, **extra}
  metrics = [{'round': 1, 'personalized_acc': final / 2, 'client_personalized_acc': [0.1, None]},
             {'round': 2, 'personalized_acc': final, 'client_personalized_acc': [final, None]}]
  return plots.Run(algorithm, setting, seed, f'/runs/{algorithm}/seed{seed}', summary,
                   metrics, dropout_clients=(1,))


@pytest.fixture
def runs():
  return [
      make_run('fedavg', 0, 0.5, 0.6, final_global_acc=0.4, best_global_acc=0.45),
      make_run('fedavg', 1, 0.7, 0.8, final_global_acc=0.6, best_global_acc=0.65),
      make_run('local', 0, 0.9, final_global_acc=None),
      make_run('local', 1, 0.0, error='NaN/Inf in training at round 1, client 2'),
  ]


def test_mean_std_skips_missing_values():
  assert plots.mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1))
  assert plots.mean_std([0.5]) == (0.5, 0.0)
  assert plots.mean_std([0.2, None, math.nan, 0.4]) == pytest.approx((0.3, 0.1))
  assert plots.mean_std([None, math.nan]) is None
  assert plots.mean_std([]) is None


def test_method_table_mean_std_failures_and_na(runs):
  fedavg, local = plots.method_table(runs)
  assert fedavg['method'] == 'fedavg' and fedavg['seeds'] == [0, 1] and not fedavg['failed']
  assert fedavg['final_personalized_acc'] == pytest.approx((0.6, 0.1))
  assert fedavg['best_personalized_acc'] == pytest.approx((0.7, 0.1))
  assert fedavg['final_global_acc'] == pytest.approx((0.5, 0.1))
  assert fedavg['final_unseen_class_acc'] is None
  assert local['seeds'] == [0]
  assert local['failed'] == [(1, 'NaN/Inf in training at round 1, client 2')]
  assert local['final_personalized_acc'] == (0.9, 0.0)  # the failed seed is left out
  assert local['final_global_acc'] is None and local['best_global_acc'] is None


def test_sweep_settings_are_separate_rows():
  table = plots.method_table([make_run('apfl', 0, 0.5, setting='beta=0.1'),
                              make_run('apfl', 0, 0.7, setting='beta=0.5'),
                              make_run('apfl', 1, 0.9, setting='beta=0.1')])
  assert [(r['method'], r['setting'], r['seeds']) for r in table] == [
      ('apfl beta=0.1', 'beta=0.1', [0, 1]), ('apfl beta=0.5', 'beta=0.5', [0])]
  assert table[0]['final_personalized_acc'] == pytest.approx((0.7, 0.2))


def test_markdown_table_formats_cells_and_drops_all_na_metrics(runs):
  text = plots.markdown_table(plots.method_table(runs))
  lines = text.splitlines()
  assert lines[0] == ('| method | seeds | personalized (final) | personalized (best) | '
                      'global (final) | global (best) | notes |')
  assert lines[2] == ('| fedavg | 0,1 | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | '
                      '0.5000 ± 0.1000 | 0.5500 ± 0.1000 |  |')
  assert lines[3] == ('| local | 0 | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 | n/a | n/a | '
                      'seed 1 failed: NaN/Inf in training at round 1, client 2 |')
  assert 'unseen' not in text


def test_all_seeds_failed_is_a_row_of_na():
  text = plots.markdown_table(plots.method_table([make_run('apfl', 0, 0, error='--beta x')]))
  assert text.splitlines()[2] == '| apfl | none | n/a | n/a | seed 0 failed: --beta x |'


def test_csv_has_fixed_columns_and_na(tmp_path, runs):
  path = tmp_path / 'results.csv'
  plots.write_csv(plots.method_table(runs), str(path))
  with open(path) as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == plots.csv_columns()
    fedavg, local = list(reader)
  assert float(fedavg['final_personalized_acc_mean']) == pytest.approx(0.6)
  assert float(fedavg['final_personalized_acc_std']) == pytest.approx(0.1)
  assert fedavg['seeds'] == '0;1' and fedavg['num_failed'] == '0'
  assert local['final_global_acc_mean'] == local['final_global_acc_std'] == 'n/a'
  assert local['num_failed'] == '1' and 'client 2' in local['errors']


def test_plots_write_pngs(tmp_path, runs):
  assert plots.plot_accuracy_vs_round(runs, str(tmp_path / 'acc.png'))
  assert plots.plot_per_client_accuracy(runs, str(tmp_path / 'clients.png'))
  pixels = np.random.default_rng(0).uniform(size=(3, 4, 8, 8, 1))
  plots.plot_generated_samples(pixels, ['a', 'b', 'c'], [2], 'title',
                               str(tmp_path / 'samples.png'))
  for name in ('acc.png', 'clients.png', 'samples.png'):
    assert os.path.getsize(tmp_path / name) > 0


def test_plots_without_data_write_nothing(tmp_path):
  failed = [make_run('fedavg', 0, 0, error='boom')]
  assert not plots.plot_accuracy_vs_round(failed, str(tmp_path / 'acc.png'))
  no_clients = plots.Run('fedavg', '', 0, '/w', {'final_personalized_acc': 0.5},
                         [{'round': 1, 'personalized_acc': 0.5}])
  assert not plots.plot_per_client_accuracy([no_clients], str(tmp_path / 'clients.png'))
  assert os.listdir(tmp_path) == []


def test_virtual_time_to_target_and_async_plots(tmp_path):
  assert plots.virtual_time_to_target([1.0, 2.5, 4.0], [0.5, 0.81, 0.9], 0.8) == 2.5
  assert plots.virtual_time_to_target([1.0, 2.0], [0.5, None], 0.8) is None
  plots.plot_accuracy_vs_virtual_time({'a': ([1, 2], [0.1, 0.2])}, str(tmp_path / 'v.png'))
  plots.plot_staleness_histogram([0, 1, 1, 3], str(tmp_path / 's.png'))
  assert (tmp_path / 'v.png').stat().st_size > 0 and (tmp_path / 's.png').stat().st_size > 0
