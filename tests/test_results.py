"""Tests of apfl_jax.studies.results on hand-made runs (no training)."""

import csv
import glob
import json
import math
import os
import re
import subprocess
import sys

from conftest import make_run
import numpy as np
import pytest

from apfl_jax.core.errors import ConfigError
from apfl_jax.studies import results


def test_mean_std_skips_missing_values():
  assert results.mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1))
  assert results.mean_std([0.5]) == (0.5, 0.0)
  assert results.mean_std([0.2, None, math.nan, 0.4]) == pytest.approx((0.3, 0.1))
  assert results.mean_std([None, math.nan]) is None
  assert results.mean_std([]) is None


def test_method_table_mean_std_failures_and_na(runs):
  fedavg, local = results.method_table(runs)
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
  table = results.method_table(
    [
      make_run('apfl', 0, 0.5, setting='beta=0.1'),
      make_run('apfl', 0, 0.7, setting='beta=0.5'),
      make_run('apfl', 1, 0.9, setting='beta=0.1'),
    ]
  )
  assert [(r['method'], r['setting'], r['seeds']) for r in table] == [
    ('apfl beta=0.1', 'beta=0.1', [0, 1]),
    ('apfl beta=0.5', 'beta=0.5', [0]),
  ]
  assert table[0]['final_personalized_acc'] == pytest.approx((0.7, 0.2))


def test_markdown_table_formats_cells_and_drops_all_na_metrics(runs):
  text = results.markdown_table(results.method_table(runs))
  lines = text.splitlines()
  assert lines[0] == (
    '| method | seeds | personalized (final) | personalized (best) | '
    'global (final) | global (best) | notes |'
  )
  assert lines[2] == (
    '| fedavg | 0,1 | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | 0.5000 ± 0.1000 | 0.5500 ± 0.1000 |  |'
  )
  assert lines[3] == (
    '| local | 0 | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 | n/a | n/a | '
    'seed 1 failed: NaN/Inf in training at round 1, client 2 |'
  )
  assert 'unseen' not in text


def test_all_seeds_failed_is_a_row_of_na():
  text = results.markdown_table(results.method_table([make_run('apfl', 0, 0, error='--beta x')]))
  assert text.splitlines()[2] == '| apfl | none | n/a | n/a | seed 0 failed: --beta x |'


def test_csv_has_fixed_columns_and_na(tmp_path, runs):
  path = tmp_path / 'results.csv'
  results.write_csv(results.method_table(runs), str(path))
  with open(path) as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == results.csv_columns()
    fedavg, local = list(reader)
  assert float(fedavg['final_personalized_acc_mean']) == pytest.approx(0.6)
  assert float(fedavg['final_personalized_acc_std']) == pytest.approx(0.1)
  assert fedavg['seeds'] == '0;1' and fedavg['num_failed'] == '0'
  assert local['final_global_acc_mean'] == local['final_global_acc_std'] == 'n/a'
  assert local['num_failed'] == '1' and 'client 2' in local['errors']


def test_final_value_is_the_last_logged_one():
  rows = [{'acc': 0.5}, {'acc': 0.7, 'x': 1.0}, {'x': 2.0}, {'acc': None}]
  assert results.final_value(rows, 'acc') == 0.7
  assert results.final_value(rows, 'x') == 2.0
  assert results.final_value(rows, 'missing') is None


def test_virtual_time_to_target():
  assert results.virtual_time_to_target([1.0, 2.5, 4.0], [0.5, 0.81, 0.9], 0.8) == 2.5
  assert results.virtual_time_to_target([1.0, 2.0], [0.5, None], 0.8) is None


def test_virtual_time_table_scores_each_seed_at_its_shortest_final_time():
  groups = {
    'sync': [
      results.Curve([10.0, 20.0, 30.0], [0.2, 0.5, 0.7]),
      results.Curve([3.0, 9.0], [0.1, 0.3]),
    ],
    'fedbuff': [
      results.Curve([4.0, 8.0, 12.0], [0.4, 0.6, 0.65]),
      results.Curve([5.0, 11.0, 16.0], [0.3, None, 0.5]),
    ],
  }
  budgets, (sync, fedbuff) = results.virtual_time_table(groups, target=0.6)
  assert budgets == [12.0, 9.0]  # per seed, the shortest final time of its runs
  assert sync['seeds'] == 2 and sync['final_time'] == pytest.approx((19.5, 10.5))
  # seed 0: last evaluation at or before 12 is 0.2 at 10; seed 1: 0.3 at 9.
  assert sync['at_budget'] == pytest.approx((0.25, 0.05))
  assert sync['time_to_target'] == (30.0, 0.0) and sync['reached'] == 1
  assert fedbuff['final_time'] == pytest.approx((14.0, 2.0))
  # seed 0: 0.65 at 12; seed 1: 0.3 at 5 (None at 11 is past the budget 9 anyway).
  assert fedbuff['at_budget'] == pytest.approx((0.475, 0.175))
  assert fedbuff['time_to_target'] == (8.0, 0.0) and fedbuff['reached'] == 1
  lines = results.virtual_time_markdown(budgets, [sync, fedbuff], 0.6, 'acc').splitlines()
  assert lines[0] == (
    '| run | seeds | final virtual time | acc at the budget | time to 0.6 | seeds reaching 0.6 |'
  )
  assert lines[3] == '| fedbuff | 2 | 14 ± 2 | 0.4750 ± 0.1750 | 8 ± 0 | 1/2 |'
  assert lines[-1].startswith(
    'Budget: the shortest final virtual time among the runs of the same seed; per seed: 12, 9.'
  )


def test_virtual_time_table_needs_the_same_seeds_in_every_group():
  groups = {'a': [results.Curve([1.0], [0.1])] * 2, 'b': [results.Curve([1.0], [0.1])]}
  with pytest.raises(ConfigError, match='--runs: every folder needs the same seeds.*a: 2, b: 1'):
    results.virtual_time_table(groups, target=0.5)


def test_virtual_time_table_target_never_reached_is_na():
  budgets, (row,) = results.virtual_time_table({'a': [results.Curve([1.0], [0.1])]}, target=0.9)
  assert row['time_to_target'] is None and row['reached'] == 0
  assert '| n/a | 0/1 |' in results.virtual_time_markdown(budgets, [row], 0.9, 'acc')


def test_gain_by_client_size_splits_the_pooled_clients_at_the_median():
  # Two seeds of 2 clients: sizes 10, 30 | 20, 40, median 25: small = sizes 10 and 20.
  accs = {
    'local': [np.array([0.5, 0.9]), np.array([0.6, 0.8])],
    'other': [np.array([0.7, 0.8]), np.array([0.6, 0.9])],
  }
  sizes = [np.array([10, 30]), np.array([20, 40])]
  (row,) = results.gain_by_client_size(accs, sizes, 'local')
  assert row['method'] == 'other' and row['clients'] == 4
  assert row['small'] == pytest.approx((0.2 + 0.0) / 2)
  assert row['large'] == pytest.approx((-0.1 + 0.1) / 2)
  assert row['all'] == pytest.approx(0.2 / 4)


def test_client_gains_command_prints_one_row_per_method(tmp_path):
  for algorithm, accs in (('local', [0.5, 0.9]), ('other', [0.7, 0.8])):
    folder = tmp_path / algorithm / 'seed0'
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(
      json.dumps({'round': 1, 'client_personalized_acc': accs}) + '\n'
    )
    (folder / 'partition.json').write_text(json.dumps({'train_counts': [[4, 6], [30, 0]]}))
  script = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), 'experiments', 'client_gains.py'
  )
  args = [sys.executable, script, f'--runs={tmp_path}', '--algorithms=other', '--seeds=0']
  done = subprocess.run(args, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert '| other | +20.00 | -10.00 | +5.00 |' in done.stdout
  missing = subprocess.run([*args[:-1], '--seeds=1'], capture_output=True, text=True, timeout=120)
  assert missing.stderr.strip().splitlines() == [
    f'error: --runs/--seeds: no run folder {tmp_path}/local/seed1'
  ]


REPO_RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'docs', 'results')
COMMITTED_TABLES = sorted(
  os.path.relpath(path, REPO_RESULTS)
  for path in glob.glob(os.path.join(REPO_RESULTS, '**', 'results.csv'), recursive=True)
)


def table_cells(markdown_lines):
  """Each table row's cells, numbers as floats (4 decimals as written)."""
  number = re.compile(r'^-?\d+\.\d+$')
  rows = []
  for line in markdown_lines:
    cells = []
    for cell in line.strip('|').split('|'):
      parts = [p.strip() for p in cell.split('±')]
      cells.append(tuple(float(p) if number.match(p) else p for p in parts))
    rows.append(cells)
  return rows


@pytest.mark.parametrize('name', COMMITTED_TABLES)
def test_committed_results_reread_to_the_tables_they_were_written_with(name):
  """Every committed results.csv reads back (today's code) into its results.md table.

  The csv keeps 6 decimals of the value the table rounded to 4, so a cell may differ by
  one unit in its last place (0.903750 is 0.9037 or 0.9038); nothing more.
  """
  csv_path = os.path.join(REPO_RESULTS, name)
  with open(os.path.join(os.path.dirname(csv_path), 'results.md')) as f:
    written = [line for line in f.read().splitlines() if line.startswith('| ')]
  reread = results.markdown_table(results.read_csv(csv_path)).splitlines()
  reread = [line for line in reread if line.startswith('| ')]
  assert len(reread) == len(written)
  for new_row, old_row in zip(table_cells(reread), table_cells(written)):
    assert len(new_row) == len(old_row)
    for new, old in zip(new_row, old_row):
      assert len(new) == len(old)
      for a, b in zip(new, old):
        if isinstance(a, float):
          assert abs(a - b) <= 1.0001e-4, (name, new_row[0], a, b)
        else:
          assert a == b, (name, a, b)


def test_read_csv_is_the_inverse_of_write_csv(tmp_path, runs):
  table = results.method_table(runs)
  results.write_csv(table, str(tmp_path / 'results.csv'))
  reread = results.read_csv(str(tmp_path / 'results.csv'))
  assert results.markdown_table(reread) == results.markdown_table(table)
  assert reread[-1]['failed'] == [(1, 'NaN/Inf in training at round 1, client 2')]
