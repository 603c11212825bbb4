"""Tests of apfl_jax.studies.pfllib_check (hand-written run folders, no training)."""

import json

import pytest

from apfl_jax.config.config import Config
from apfl_jax.studies import pfllib_check


def write_run(folder, algorithm, seed, accuracies, partition='dirichlet', setting='', **changes):
  """A compare.py run folder with one metrics row per accuracy (None: not evaluated)."""
  workdir = folder / 'runs' / algorithm / setting / f'seed{seed}'
  workdir.mkdir(parents=True)
  settings = {
    **pfllib_check.SETTING,
    **pfllib_check.PARTITION_SETTING[partition],
    **pfllib_check.ALGORITHM_SETTING.get(algorithm, {}),
  }
  config = Config(algorithm=algorithm, seed=seed, num_rounds=50, **settings).replace(**changes)
  (workdir / 'config.json').write_text(config.to_json())
  rows = [{'round': r, 'personalized_acc_weighted': a} for r, a in enumerate(accuracies, 1)]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def table_rows(table):
  return {
    tuple(c.strip() for c in line.strip('|').split('|'))[1]: [
      c.strip() for c in line.strip('|').split('|')
    ]
    for line in table.splitlines()[2:]
  }


def test_best_final_and_rounds_are_read_from_metrics(tmp_path):
  write_run(tmp_path, 'ditto', 0, [0.5, 0.9, None, 0.8])
  write_run(tmp_path, 'fedavg', 0, [0.4, 0.6])
  write_run(tmp_path, 'fedavg', 1, [0.7, 0.5])
  rows = table_rows(pfllib_check.report([('dirichlet', str(tmp_path))]))
  # partition, method, published, best, best round, final, rounds run, seeds
  assert rows['ditto'] == ['dirichlet', 'ditto', '97.47', '90.00', '2', '80.00', '4/50', '0']
  assert rows['fedavg'][3:] == ['65.00 ± 5.00', '2, 1', '55.00 ± 5.00', '2/50, 2/50', '0,1']
  assert rows['fedrep'][3] == 'not run'
  assert set(rows) == set(pfllib_check.PUBLISHED['dirichlet'])


def test_swept_setting_is_its_own_row_beside_the_published_number(tmp_path):
  write_run(tmp_path, 'apfl_deng', 0, [0.5])
  write_run(tmp_path, 'apfl_deng', 0, [0.7], setting='apfl_deng_alpha=1.0', apfl_deng_alpha=1.0)
  rows = table_rows(pfllib_check.report([('dirichlet', str(tmp_path))]))
  assert rows['apfl_deng'][2:4] == ['97.25', '50.00']
  assert rows['apfl_deng apfl_deng_alpha=1.0'][2:4] == ['97.25', '70.00']


def test_algorithm_without_a_published_number_is_listed_after_them(tmp_path):
  write_run(tmp_path, 'apfl', 0, [0.3], partition='pathological')
  table = pfllib_check.report([('pathological', str(tmp_path))])
  assert table.splitlines()[-1].split('|')[2:4] == [' apfl ', ' not reported ']


@pytest.mark.parametrize(
  'flag,value',
  [
    ('batch_size', 32),
    ('test_split', 'proportional'),
    ('dirichlet_alpha', 0.5),
    ('local_steps', 20),
  ],
)
def test_run_of_another_setting_is_refused_naming_the_flag(tmp_path, flag, value):
  write_run(tmp_path, 'fedavg', 0, [0.5], **{flag: value})
  with pytest.raises(pfllib_check.CheckError, match=f'--{flag}={value} but'):
    pfllib_check.report([('dirichlet', str(tmp_path))])


@pytest.mark.parametrize(
  'algorithm,flag,value',
  [
    ('fedrep', 'fedrep_head_epochs', 10),
    ('fedgen', 'fedgen_regularizer', 'fedgen'),
    ('fedgen', 'fedgen_generator_lr_decay', 0.98),
  ],
)
def test_paper_defaults_are_refused_as_not_pfllibs_setting(tmp_path, algorithm, flag, value):
  write_run(tmp_path, algorithm, 0, [0.5], **{flag: value})
  with pytest.raises(pfllib_check.CheckError, match=f'--{flag}={value} but'):
    pfllib_check.report([('dirichlet', str(tmp_path))])


def test_config_from_before_the_new_flags_is_pfllibs_setting(tmp_path):
  write_run(tmp_path, 'fedrep', 0, [0.5])
  config_path = tmp_path / 'runs' / 'fedrep' / 'seed0' / 'config.json'
  config = json.loads(config_path.read_text())
  for name in pfllib_check.BEFORE_FLAG:
    del config[name]
  config_path.write_text(json.dumps(config))
  assert table_rows(pfllib_check.report([('dirichlet', str(tmp_path))]))['fedrep'][3] == '50.00'


def test_bad_runs_flag_is_refused():
  with pytest.raises(pfllib_check.CheckError, match='--runs'):
    pfllib_check.parse_runs(['iid:somewhere'])


def test_report_file_has_the_table_and_a_figure_per_partition(tmp_path):
  runs = tmp_path / 'dir_runs'
  write_run(runs, 'fedavg', 0, [0.4, 0.6])
  report = tmp_path / 'pfllib.md'
  pfllib_check.write_report([('dirichlet', str(runs))], str(report), 'python check')
  text = report.read_text()
  assert '| dirichlet | fedavg | 85.85 | 60.00 |' in text and '`python check`' in text
  assert (tmp_path / 'accuracy_vs_round_dirichlet.png').stat().st_size > 0
  assert '(accuracy_vs_round_dirichlet.png)' in text
