"""End-to-end tests of apfl_jax.runner.train and experiments/main.py (synthetic data, tiny runs)."""

import io
import json
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from apfl_jax.config.config import RENAMED_FLAGS, Config
from apfl_jax.core.errors import ConfigError, RunInterrupted, TrainingDivergedError
from apfl_jax.runner import callbacks, checkpoints, drivers, run_folder, train
from apfl_jax.runner import experiment as experiment_lib
from apfl_jax.runner import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'experiments', 'main.py')


def tiny_config(**changes):
  config = Config(
    dataset='mnist',
    num_clients=4,
    partition='dirichlet',
    dirichlet_alpha=0.5,
    min_samples_per_client=5,
    num_rounds=4,
    batch_size=8,
    local_epochs=1,
    # One lockstep group: each size group is one more copy of the training step to compile
    # (the groups are tested in test_local_training and, end to end, in the FedAvg resume).
    max_client_buckets=1,
    learning_rate=0.05,
    checkpoint_every=2,
    verbose=False,
  )
  return config.replace(**changes)


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    r.pop('elapsed_s')
  return rows


@pytest.mark.parametrize('algorithm', ['fedavg', 'local'])
def test_run_writes_metrics_partition_and_checkpoints(tmp_path, synthetic_data, algorithm):
  summary = train.train_and_evaluate(tiny_config(algorithm=algorithm), str(tmp_path))
  rows = read_rows(tmp_path)
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  for key in ('personalized_acc', 'personalized_acc_weighted', 'global_acc', 'train_loss'):
    assert key in rows[0]
  if algorithm == 'local':
    assert rows[-1]['global_acc'] is None
  else:
    assert 0.0 <= rows[-1]['global_acc'] <= 1.0
  assert summary['final_personalized_acc'] == rows[-1]['personalized_acc']
  for name in ('config.json', 'partition.txt', 'partition.json', 'summary.json'):
    assert os.path.exists(tmp_path / name)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_pooled_test_split_trains_and_tests_on_one_device_copy(tmp_path, synthetic_data):
  config = tiny_config(test_split='pooled', num_rounds=1)
  experiment = experiment_lib.build_experiment(config)
  pool = len(synthetic_data.train_labels) + len(synthetic_data.test_labels)
  assert experiment.data.train_images is experiment.data.test_images
  assert experiment.data.train_images.shape[0] == pool
  counts = np.asarray(experiment.data.train_count) + np.asarray(experiment.data.test_count)
  assert counts.sum() == sum(
    len(a) + len(b)
    for a, b in zip(experiment.partition.train_indices, experiment.partition.test_indices)
  )
  np.testing.assert_array_equal(
    np.asarray(experiment.data.train_count), np.floor(0.75 * counts).astype(np.int32)
  )
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary['final_personalized_acc'] <= 1.0


# AP-FL keeps a persistent local model per client: a resume that lost it would change
# the personalized accuracies of the rounds after the checkpoint.
APFL_TINY = dict(
  algorithm='apfl',
  embedding='onehot',
  generator='feature',
  noise_dim=8,
  generator_hidden_dim=16,
  generator_steps=2,
  generator_batch_size=8,
  apfl_synthetic_per_class=4,
  apfl_friend_batch_size=8,
)


@pytest.mark.slow
@pytest.mark.parametrize('changes', [{'max_client_buckets': 4}, APFL_TINY], ids=['fedavg', 'apfl'])
def test_resumed_run_equals_uninterrupted_run(tmp_path, synthetic_data, monkeypatch, changes):
  config = tiny_config(
    join_ratio=0.5, server_optimizer='momentum', server_learning_rate=0.5, **changes
  ).validate()
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  original = drivers.cohort_for_round

  def interrupt_at_round_4(seed, round_index, *args, **kwargs):
    if round_index == 4:
      raise KeyboardInterrupt
    return original(seed, round_index, *args, **kwargs)

  monkeypatch.setattr(drivers, 'cohort_for_round', interrupt_at_round_4)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  # Rounds 1-3 were evaluated, but only round 2 was checkpointed.
  assert [r['round'] for r in read_rows(tmp_path / 'resumed')] == [1, 2, 3]
  monkeypatch.setattr(drivers, 'cohort_for_round', original)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert read_rows(tmp_path / 'resumed') == read_rows(tmp_path / 'straight')


def test_longer_rerun_of_a_folder_written_before_the_renames_continues(tmp_path, synthetic_data):
  train.train_and_evaluate(tiny_config(num_rounds=2), str(tmp_path / 'a'))
  # As a version before AP-FL's flags took the apfl_ prefix wrote it.
  path = tmp_path / 'a' / 'config.json'
  values = json.loads(path.read_text())
  for old, new in RENAMED_FLAGS.items():
    values[old] = values.pop(new)
  path.write_text(json.dumps(values))
  reread = run_folder.read_config(str(tmp_path / 'a'))
  assert reread == tiny_config(num_rounds=2, workdir=str(tmp_path / 'a'))
  train.train_and_evaluate(tiny_config(num_rounds=4), str(tmp_path / 'a'))
  train.train_and_evaluate(tiny_config(num_rounds=4), str(tmp_path / 'b'))
  assert read_rows(tmp_path / 'a') == read_rows(tmp_path / 'b')


def test_rerun_of_a_finished_run_rereads_it_without_training(tmp_path, synthetic_data, capsys):
  train.train_and_evaluate(tiny_config(num_rounds=2, verbose=True), str(tmp_path))
  rows = read_rows(tmp_path)
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(num_rounds=2, verbose=True), str(tmp_path))
  out = capsys.readouterr().out
  assert 'resuming' in out and 'after round 2' in out
  assert 'compiling' not in out
  assert read_rows(tmp_path) == rows


def test_workdir_of_another_config_is_refused(tmp_path, synthetic_data):
  train.train_and_evaluate(tiny_config(num_rounds=1), str(tmp_path))
  with pytest.raises(ConfigError, match='--learning_rate'):
    train.train_and_evaluate(tiny_config(num_rounds=1, learning_rate=0.1), str(tmp_path))


def test_workdir_of_an_older_version_is_used_with_a_warning_naming_the_new_flags(
  tmp_path, monkeypatch
):
  config = tiny_config(num_rounds=1)
  workdir_lib.commit_workdir(str(tmp_path), config)
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  del written['fedrep_head_epochs'], written['fedasync_rho']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(written, f)
  warnings = []
  monkeypatch.setattr(
    workdir_lib.logging, 'warning', lambda msg, *args: warnings.append(msg % args)
  )
  assert workdir_lib.open_workdir(str(tmp_path), config) == str(tmp_path)
  assert len(warnings) == 1
  # The flags in Config's field order, each named once.
  assert 'without --fedasync_rho, --fedrep_head_epochs: its run is used as if' in warnings[0]
  workdir_lib.commit_workdir(str(tmp_path), config)
  warnings.clear()
  workdir_lib.open_workdir(str(tmp_path), config)
  assert warnings == []


def test_nan_names_round_and_client(tmp_path, synthetic_data):
  with pytest.raises(TrainingDivergedError, match=r'round 1, client \d'):
    train.train_and_evaluate(tiny_config(learning_rate=1e38), str(tmp_path))


def test_cohort_is_deterministic_and_sized_by_join_ratio():
  a = drivers.cohort_for_round(0, 5, 10, 0.3)
  np.testing.assert_array_equal(a, drivers.cohort_for_round(0, 5, 10, 0.3))
  assert len(a) == 3 and len(np.unique(a)) == 3
  assert not all(np.array_equal(a, drivers.cohort_for_round(0, r, 10, 0.3)) for r in range(6, 9))


def run_main(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, MAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=120
  )


@pytest.mark.parametrize(
  'flag,value',
  [
    ('dirichlet_alpha', 0.0),
    ('dirichlet_alpha', -1.0),
    ('batch_size', 0),
    ('dataset', 'imagenet'),
    ('model', 'vgg'),
    ('algorithm', 'fedfoo'),
    ('partition', 'zipf'),
    ('num_clients', 0),
    ('join_ratio', 1.5),
    ('apfl_beta', 2.0),
    ('server', 'gossip'),
    ('dropout_clients', '3,x'),
    ('dropout_clients', '0,99'),
    ('learning_rate', 0.0),
    ('embedding', 'word2vec'),
    ('test_split', 'random'),
    ('client_train_fraction', 1.0),
    ('fedbuff_weighting', 'sum'),
    ('fedgen_regularizer', 'fedprox'),
    ('fedrep_head_epochs', 0),
    ('fedgen_beta', -1.0),
    ('fedgen_generator_lr_decay', 0.0),
    ('fedasync_rho', 0.1),  # needs --server=fedasync
  ],
)
def test_invalid_value_names_its_flag(flag, value):
  with pytest.raises(ConfigError, match=f'--{flag}') as error:
    Config(**{flag: value}).validate()
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('flag,value', [('dirichlet_alpha', '0'), ('model', 'vgg')])
def test_invalid_flag_exits_with_one_line_naming_it(flag, value):
  result = run_main(f'--{flag}={value}', '--num_rounds=1')
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert f'--{flag}' in lines[0]


def test_too_many_monopoly_clients_is_refused():
  result = run_main('--partition=monopoly', '--num_clients=5', '--monopoly_clients=5')
  assert result.returncode != 0
  assert '--monopoly_clients' in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  result = run_main('--flagfile=smoke.flags', f'--workdir={blocker}/run')
  assert result.returncode != 0
  assert result.stderr.strip().startswith('error: --workdir')
  assert len(result.stderr.strip().splitlines()) == 1


def test_missing_dataset_fails_fast_with_one_line(tmp_path):
  # A bare flagfile name is found in experiments/ from any working directory.
  result = run_main(
    '--flagfile=cifar10.flags',
    f'--data_dir={tmp_path}',
    f'--workdir={tmp_path}/run',
    cwd=str(tmp_path),
  )
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'cifar10' in lines[0], result.stderr


def test_async_run_resumes_exactly_and_logs_virtual_time(tmp_path, synthetic_data, monkeypatch):
  config = tiny_config(
    server='fedbuff',
    buffer_size=2,
    speed_distribution='lognormal',
    speed_spread=1.0,
    join_ratio=0.75,
  )
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  rows = read_rows(tmp_path / 'straight')
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  times = [r['virtual_time'] for r in rows]
  assert times == sorted(times) and times[0] > 0
  assert all(r['staleness_mean'] >= 0 for r in rows)

  original = drivers.AsyncRounds.step

  def interrupt_at_round_4(self, async_state, round_index, rng):
    if round_index == 4:
      raise KeyboardInterrupt
    return original(self, async_state, round_index, rng)

  monkeypatch.setattr(drivers.AsyncRounds, 'step', interrupt_at_round_4)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(drivers.AsyncRounds, 'step', original)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert read_rows(tmp_path / 'resumed') == rows


def test_all_clients_dropping_out_is_refused():
  with pytest.raises(ConfigError, match='--dropout_clients'):
    Config(num_clients=3, dropout_clients='0,1,2').validate()


def test_summary_has_final_and_best_of_every_accuracy():
  rows = [
    {'round': 1, 'personalized_acc': 0.5, 'dropout_personalized_acc_no_label_prior': 0.3,
     'client_personalized_acc': [0.5], 'train_loss': 1.0},
    {'round': 2, 'personalized_acc': 0.4, 'dropout_personalized_acc_no_label_prior': 0.6,
     'client_personalized_acc': [0.4], 'train_loss': 0.5},
  ]  # fmt: skip
  summary = run_folder.summarize(rows)
  assert summary['final_personalized_acc'] == 0.4
  assert (summary['best_personalized_acc'], summary['best_personalized_acc_round']) == (0.5, 1)
  assert summary['final_dropout_personalized_acc_no_label_prior'] == 0.6
  assert summary['best_dropout_personalized_acc_no_label_prior_round'] == 2
  assert not any('loss' in key or 'client_' in key for key in summary)


def test_abandoned_orbax_reads_are_recognised_and_other_unraisables_are_not():
  async def read():  # a coroutine whose code lives in an orbax file
    pass

  orbax_code = read.__code__.replace(co_filename='/site-packages/orbax/checkpoint/x.py')
  coroutine = types.FunctionType(orbax_code, {})()
  closed_loop = types.SimpleNamespace(object=None, exc_value=RuntimeError('Event loop is closed'))
  other = types.SimpleNamespace(object=None, exc_value=ValueError('a real problem'))
  assert checkpoints.is_abandoned_orbax_read(
    types.SimpleNamespace(object=coroutine, exc_value=None)
  )
  assert checkpoints.is_abandoned_orbax_read(closed_loop)
  assert not checkpoints.is_abandoned_orbax_read(other)
  coroutine.close()


def test_stderr_filter_drops_closed_loop_tracebacks_of_any_thread_and_keeps_the_rest():
  out = io.StringIO()
  stderr = checkpoints.WithoutClosedLoopTracebacks(out)

  def traceback_ending_in(last):
    for text in ('Traceback (most recent call last):\n', '  File "x.py", line 1, in f\n'):
      stderr.write(text)
    stderr.write(last)
    stderr.write('\n')

  traceback_ending_in('RuntimeError: Event loop is closed')
  stderr.write('a warning\n')
  traceback_ending_in('ValueError: a real problem')
  threads = [
    threading.Thread(target=traceback_ending_in, args=('RuntimeError: Event loop is closed',))
    for _ in range(4)
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  stderr.write('error: the one line\n')
  assert out.getvalue() == (
    'a warning\nTraceback (most recent call last):\n  File "x.py", line 1, in f\n'
    'ValueError: a real problem\nerror: the one line\n'
  )


def test_a_requested_stop_ends_the_loop_even_if_its_interrupt_was_swallowed(
  tmp_path, synthetic_data
):
  """main.py's signal handler requests a stop before raising KeyboardInterrupt; when that
  exception is lost (it landed in a __del__), the loop stops at the next round anyway, and
  the request is spent: the rerun resumes and finishes."""
  config = tiny_config(algorithm='fedavg', num_rounds=2)
  callbacks.request_stop()
  with pytest.raises(RunInterrupted, match='interrupted in round 1/2'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [r['round'] for r in read_rows(str(tmp_path / 'run'))] == [1, 2] and summary
