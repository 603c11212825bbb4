"""End-to-end tests of apfl_jax.studies.compare (synthetic data, tiny runs, in-process)."""

import csv
import json
import os

from conftest import make_synthetic_dataset
import numpy as np
import pytest
from test_train import read_rows

from apfl_jax.algorithms.fedprox import FedProx
from apfl_jax.data import datasets
from apfl_jax.runner import drivers
from apfl_jax.studies import compare, results

# End-to-end runs of the study on tiny federations: CI runs them, `-m 'not slow'` skips them.
pytestmark = pytest.mark.slow

TINY = [
  '--dataset=mnist',
  '--model=cnn',
  '--num_clients=4',
  '--min_samples_per_client=5',
  '--num_rounds=2',
  '--batch_size=8',
  '--local_epochs=0',
  '--local_steps=2',
  '--learning_rate=0.05',
  '--checkpoint_every=2',
  '--noverbose',
]


@pytest.fixture
def synthetic_data(monkeypatch):
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  monkeypatch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)
  return dataset


def read_csv(out):
  with open(os.path.join(out, 'results.csv')) as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def summary_of(out, algorithm, seed):
  with open(os.path.join(out, 'runs', algorithm, f'seed{seed}', 'summary.json')) as f:
    return json.load(f)


def test_two_algorithms_two_seeds(tmp_path, synthetic_data, monkeypatch):
  # An iid split gives every seed the same shapes, so each algorithm compiles once.
  out = str(tmp_path / 'cmp')
  argv = [
    'compare.py',
    *TINY,
    '--partition=iid',
    '--algorithms=fedavg,local',
    '--seeds=0,1',
    f'--out={out}',
  ]
  assert compare.main(argv) == 0

  columns, rows = read_csv(out)
  assert columns == results.csv_columns()
  assert [r['method'] for r in rows] == ['fedavg', 'local']
  for row in rows:
    assert row['seeds'] == '0;1' and row['num_failed'] == '0'
    summaries = [summary_of(out, row['algorithm'], seed) for seed in (0, 1)]
    for key in (
      'final_personalized_acc',
      'best_personalized_acc',
      'final_global_acc',
      'best_global_acc',
    ):
      values = [s.get(key) for s in summaries]
      if None in values:
        assert row['algorithm'] == 'local' and 'global' in key
        assert row[f'{key}_mean'] == row[f'{key}_std'] == 'n/a'
        continue
      assert float(row[f'{key}_mean']) == pytest.approx(np.mean(values), abs=1e-6)
      assert float(row[f'{key}_std']) == pytest.approx(np.std(values), abs=1e-6)
    assert row['final_unseen_class_acc_mean'] == 'n/a'

  # Same seed, same partition, whatever the algorithm.
  def partition(algorithm, seed):
    return (tmp_path / 'cmp' / 'runs' / algorithm / f'seed{seed}' / 'partition.json').read_text()

  assert partition('fedavg', 0) == partition('local', 0)
  assert partition('fedavg', 1) == partition('local', 1)
  assert partition('fedavg', 0) != partition('fedavg', 1)

  for name in ('accuracy_vs_round.png', 'per_client_accuracy.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  markdown = (tmp_path / 'cmp' / 'results.md').read_text()
  assert '--algorithms=fedavg,local' in markdown and 'Seeds: 0, 1' in markdown
  assert '| local | 0,1 |' in markdown and '![' in markdown
  # The flags as given: no algorithm's filled-in defaults (fedavg's --generator=feature).
  flags_line = next(line for line in markdown.splitlines() if line.startswith('- Flags'))
  assert '--partition=iid' in flags_line and '--generator' not in flags_line

  # A rerun finds every run finished and trains no round.
  monkeypatch.setattr(drivers, 'cohort_for_round', lambda *a, **k: pytest.fail('retrained'))
  assert compare.main(argv) == 0
  assert read_csv(out)[1] == rows


def test_sweep_rows_failed_run_and_generated_samples(tmp_path, synthetic_data):
  # Client 3 owns class 3 alone and drops out before round 1: class 3 is unseen.
  out = str(tmp_path / 'sweep')
  argv = [
    'compare.py',
    *TINY,
    '--partition=monopoly',
    '--classes_per_client=2',
    '--monopoly_clients=1',
    '--monopoly_classes_per_client=1',
    '--dropout_clients=monopoly',
    '--dropout_round=0',
    '--algorithms=apfl',
    '--generator=image',
    '--embedding=onehot',
    '--generator_steps=2',
    '--generator_batch_size=8',
    '--apfl_synthetic_per_class=4',
    '--apfl_friend_batch_size=8',
    '--apfl_unseen_control',
    '--seeds=0',
    '--sweep=batch_size:8,0',
    f'--out={out}',
  ]
  assert compare.main(argv) == 0

  _, rows = read_csv(out)
  assert [r['method'] for r in rows] == ['apfl batch_size=8', 'apfl batch_size=0']
  finished, failed = rows
  summary = json.loads(
    (tmp_path / 'sweep' / 'runs' / 'apfl' / 'batch_size=8' / 'seed0' / 'summary.json').read_text()
  )
  for metric in (
    'personalized_acc',
    'dropout_personalized_acc',
    'unseen_class_acc',
    'unseen_class_seen_acc',
    'unseen_class_balanced_acc',
    'unseen_class_acc_onehot_control',
    'unseen_class_seen_acc_onehot_control',
    'unseen_class_balanced_acc_onehot_control',
  ):
    assert float(finished[f'final_{metric}_mean']) == pytest.approx(
      summary[f'final_{metric}'], abs=1e-6
    )
    assert float(finished[f'final_{metric}_std']) == 0.0
  assert failed['seeds'] == '' and failed['num_failed'] == '1'
  assert failed['errors'].startswith('seed 0 failed: --batch_size')
  assert failed['final_personalized_acc_mean'] == 'n/a'
  markdown = (tmp_path / 'sweep' / 'results.md').read_text()
  assert 'seed 0 failed: --batch_size' in markdown and 'unseen classes (final)' in markdown
  assert 'unseen classes, one-hot control (final)' in markdown
  assert 'one-hot control balanced (final)' in markdown
  assert os.path.getsize(os.path.join(out, 'generated_samples_batch_size=8.png')) > 0
  assert not os.path.exists(os.path.join(out, 'generated_samples_batch_size=0.png'))


def test_algorithm_flags_apply_to_one_algorithm_and_label_its_row():
  compare.define_flags()  # as compare.main does; this test may run first in its process
  parsed = compare.parse_algorithm_flags(
    ['fedgen.fedgen_alpha=2', 'fedgen.fedgen_beta=0.5', 'apfl.apfl_beta=0.01'], ['fedgen', 'apfl']
  )
  assert parsed == {
    'fedgen': ('fedgen_alpha=2,fedgen_beta=0.5', {'fedgen_alpha': 2.0, 'fedgen_beta': 0.5}),
    'apfl': ('apfl_beta=0.01', {'apfl_beta': 0.01}),
  }
  assert compare.run_workdir('out', 'fedgen', 'fedgen_alpha=2 apfl_beta=0.1', 0) == os.path.join(
    'out', 'runs', 'fedgen', 'fedgen_alpha=2_apfl_beta=0.1', 'seed0'
  )
  for bad in ('fedavg.learning_rate=0.1', 'fedgen.no_such_flag=1', 'fedgen.seed=1', 'fedgen'):
    with pytest.raises(compare.ConfigError, match='ALGORITHM.FLAG=VALUE'):
      compare.parse_algorithm_flags([bad], ['fedgen'])
  with pytest.raises(compare.ConfigError, match='bad value'):
    compare.parse_algorithm_flags(['fedgen.fedgen_alpha=x'], ['fedgen'])


def test_a_group_refused_while_tracing_runs_one_program_per_run(
  tmp_path, synthetic_data, monkeypatch, capsys
):
  """A FedProx whose round needs mu as a Python number: the seeds x mu program is refused
  when traced, and each run then trains alone, equal to a run outside the comparison."""
  original = FedProx.client_update

  def needs_python_mu(self, *args):
    if self.mu > 0.5:  # a Python branch: fine with a number, refused with a traced one
      raise AssertionError('mu is at most 0.2 here')
    return original(self, *args)

  monkeypatch.setattr(FedProx, 'client_update', needs_python_mu)
  out = str(tmp_path / 'cmp')
  argv = [
    'compare.py',
    *TINY,
    '--partition=iid',
    '--algorithms=fedprox',
    '--sweep=fedprox_mu:0.1,0.2',
    '--seeds=0',
    f'--out={out}',
  ]
  assert compare.main(argv) == 0
  printed = capsys.readouterr().out
  assert (
    'fedprox: one program per run (--fedprox_mu: the algorithm needs one of mu as a fixed '
    'value (TracerBoolConversionError); run the experiments as separate programs)'
  ) in printed
  _, rows = read_csv(out)
  assert [(r['setting'], r['num_failed']) for r in rows] == [
    ('fedprox_mu=0.1', '0'),
    ('fedprox_mu=0.2', '0'),
  ]
  alone = str(tmp_path / 'alone')
  assert compare.main([*argv[:-1], '--noexperiment_axis', f'--out={alone}']) == 0
  assert 'one program per run' not in capsys.readouterr().out
  for setting in ('fedprox_mu=0.1', 'fedprox_mu=0.2'):
    run = os.path.join('runs', 'fedprox', setting, 'seed0')
    assert read_rows(os.path.join(out, run)) == read_rows(os.path.join(alone, run))
