"""The README's reliability promise, tried as a user would: bad inputs and injected faults.

Bad inputs (at least 40): each must end with a non-zero exit, at most 2 lines on stderr,
no traceback, and the flag or file named. Most are checked in-process against the
validation that main.py runs (`Config.validate`, `preflight`, `load_dataset`); a
representative subset (one of each kind: flag, data size, data dir, flag parsing, missing
data set) runs the real `python experiments/main.py`, all at once.

Faults (at least 8): each must end in a resumed run whose metrics equal the uninterrupted
run's (all but `elapsed_s`), or in a one-line error that loses nothing a checkpoint held.
They run main.py on a tiny Fashion-MNIST stand-in (10 classes, 120 training images, in a
data dir that holds a prepared tfds folder stub and the decoded-array cache, so nothing is
decoded), 3 clients, 4 rounds of 2 local steps, with a shared persistent jax compilation
cache so that only the first subprocess compiles.
"""

from concurrent import futures
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

from conftest import make_synthetic_dataset
import jax
import numpy as np
import pytest
from test_train import read_rows

from apfl_jax import models
from apfl_jax.config import preflight
from apfl_jax.config.config import Config
from apfl_jax.core.errors import ConfigError, TrainingDivergedError, UserError
from apfl_jax.data import datasets
from apfl_jax.runner import drivers, train
from apfl_jax.runner import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'experiments', 'main.py')
ROUNDS = 4
SMALL_RUN = (
  '--dataset=fashion_mnist',
  '--num_clients=3',
  '--partition=dirichlet',
  '--dirichlet_alpha=1',
  '--min_samples_per_client=5',
  f'--num_rounds={ROUNDS}',
  '--local_epochs=0',
  '--local_steps=2',
  '--batch_size=8',
  '--learning_rate=0.05',
  '--checkpoint_every=1',
  '--noverbose',
)


def write_fake_fashion_mnist(root):
  """A data dir in which load_dataset('fashion_mnist') finds a tiny cached data set."""
  version = root / 'fashion_mnist' / '3.0.1'
  version.mkdir(parents=True)
  (version / 'dataset_info.json').write_text('{}')
  (version / 'fashion_mnist-train.array_record-00000-of-00001').write_text('')
  rng = np.random.default_rng(0)

  def draw(per_class):
    labels = np.repeat(np.arange(10), per_class).astype(np.int32)
    return rng.integers(0, 256, (len(labels), 28, 28, 1)).astype(np.uint8), labels

  (train_x, train_y), (test_x, test_y) = draw(12), draw(4)
  (root / datasets.CACHE_DIRNAME).mkdir()
  np.savez(
    root / datasets.CACHE_DIRNAME / 'fashion_mnist-3.0.1-v1.npz',
    train_images=train_x,
    train_labels=train_y,
    test_images=test_x,
    test_labels=test_y,
    class_names=np.array([f'class{k}' for k in range(10)]),
  )


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliability')
  write_fake_fashion_mnist(root / 'data')
  variables = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  return types.SimpleNamespace(root=root, data=root / 'data', variables=variables)


def command(env, *args):
  return [sys.executable, MAIN, f'--data_dir={env.data}', *args]


def run(env, *args, timeout=180):
  return subprocess.run(
    command(env, *args),
    cwd=env.root,
    env=env.variables,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start(env, *args):
  return subprocess.Popen(
    command(env, *args),
    cwd=env.root,
    env=env.variables,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def assert_one_line_error(returncode, stderr, *names):
  assert returncode != 0
  lines = stderr.strip().splitlines()
  assert 1 <= len(lines) <= 2, stderr
  assert 'Traceback' not in stderr, stderr
  for name in names:
    assert name in stderr, stderr


def wait_for_checkpoint(workdir, step, process, timeout=120):
  """Waits until `step` is committed (orbax renames its temporary folder at the end)."""
  path = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert process.poll() is None, process.stderr.read()
    assert time.time() < deadline, f'no checkpoint {step} in {timeout} s'
    time.sleep(0.02)


@pytest.fixture(scope='module')
def reference(env):
  """An uninterrupted run (the first subprocess: it fills the compilation cache)."""
  workdir = env.root / 'reference'
  result = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  rows = read_rows(workdir)
  assert [r['round'] for r in rows] == list(range(1, ROUNDS + 1))
  return types.SimpleNamespace(workdir=workdir, rows=rows)


def copy_of_reference(env, reference, name, keep_rounds):
  """The reference workdir as a kill after round `keep_rounds` would have left it."""
  workdir = env.root / name
  shutil.copytree(reference.workdir, workdir)
  for step in range(keep_rounds + 1, ROUNDS + 1):
    shutil.rmtree(workdir / 'checkpoints' / str(step), ignore_errors=True)
  lines = (workdir / 'metrics.jsonl').read_text().splitlines(keepends=True)
  (workdir / 'metrics.jsonl').write_text(''.join(lines[:keep_rounds]))
  return workdir


def largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------- bad inputs

FLAG_CASES = [
  ('seed', {'seed': -1}),
  ('seed', {'seed': 2**32}),
  ('fedprox_mu', {'algorithm': 'fedprox', 'fedprox_mu': math.nan}),
  ('fedprox_mu', {'fedprox_mu': -1.0}),
  ('ditto_lambda', {'ditto_lambda': math.nan}),
  ('staleness_exponent', {'staleness_exponent': math.nan}),
  ('fedgen_alpha', {'fedgen_alpha': math.nan}),
  ('learning_rate', {'learning_rate': math.nan}),
  ('learning_rate', {'learning_rate': 0.0}),
  ('server_learning_rate', {'server_learning_rate': -1.0}),
  ('batch_size', {'batch_size': 0}),
  ('num_clients', {'num_clients': 0}),
  ('num_rounds', {'num_rounds': 0}),
  ('eval_every', {'eval_every': 0}),
  ('checkpoint_every', {'checkpoint_every': 0}),
  ('classes_per_client', {'classes_per_client': 0}),
  ('dirichlet_alpha', {'dirichlet_alpha': 0.0}),
  ('dirichlet_alpha', {'dirichlet_alpha': math.nan}),
  ('join_ratio', {'join_ratio': 0.0}),
  ('join_ratio', {'join_ratio': 1.5}),
  ('apfl_beta', {'algorithm': 'apfl', 'apfl_beta': 2.0}),
  ('apfl_beta', {'apfl_beta': math.nan}),
  ('local_epochs', {'local_epochs': -1}),
  ('local_epochs', {'local_epochs': 0, 'local_steps': 0}),
  ('min_samples_per_client', {'min_samples_per_client': 0}),
  ('monopoly_clients', {'partition': 'monopoly', 'num_clients': 5, 'monopoly_clients': 5}),
  ('dropout_clients', {'dropout_clients': '3,x'}),
  ('dropout_clients', {'dropout_clients': '0,99'}),
  ('dataset', {'dataset': 'imagenet'}),
  ('model', {'model': 'vgg'}),
  ('algorithm', {'algorithm': 'fedfoo'}),
  ('partition', {'partition': 'zipf'}),
  ('server', {'server': 'gossip'}),
  ('client_train_fraction', {'client_train_fraction': 1.0}),
  ('speed_trace', {'speed_distribution': 'trace', 'speed_trace': '/nonexistent.csv'}),
  ('max_staleness', {'max_staleness': 0}),
  ('generator_learning_rate', {'generator_learning_rate': math.nan}),
  ('server_mixing', {'server_mixing': 1.5}),
  ('concurrency', {'concurrency': -1}),
  ('buffer_size', {'buffer_size': 0}),
]


@pytest.mark.parametrize('flag,changes', FLAG_CASES)
def test_invalid_flag_is_one_line_naming_it(flag, changes):
  with pytest.raises(ConfigError, match=f'--{flag}') as error:
    Config(**changes).validate()
  assert '\n' not in str(error.value)


# 600 training examples of 10 classes, like a small Fashion-MNIST.
DATA_LABELS = np.repeat(np.arange(10), 60)
DATA_CASES = [
  ('num_clients', {'num_clients': 100000}),
  ('num_clients', {'num_clients': 100, 'min_samples_per_client': 10}),
  ('classes_per_client', {'partition': 'pathological', 'classes_per_client': 11}),
  ('classes_per_client', {'partition': 'monopoly', 'classes_per_client': 9}),
  ('batch_size', {'batch_size': 100000}),
]


@pytest.mark.parametrize('flag,changes', DATA_CASES)
def test_size_the_data_cannot_satisfy_is_one_line_naming_it(flag, changes):
  config = Config(**changes).validate()
  with pytest.raises(ConfigError, match=f'--{flag}') as error:
    preflight.check_data(config, DATA_LABELS, 10, 'fashion_mnist')
  assert '\n' not in str(error.value)


def test_sizes_the_data_can_satisfy_pass():
  for changes in (
    {'num_clients': 60},
    {'partition': 'pathological', 'classes_per_client': 10},
    {'batch_size': 600},
  ):
    preflight.check_data(Config(**changes).validate(), DATA_LABELS, 10, 'fashion_mnist')


def test_batch_larger_than_every_client_names_batch_size():
  with pytest.raises(ConfigError, match='--batch_size=50 is larger than the largest client'):
    preflight.check_round(Config(batch_size=50), np.array([10, 40, 20]), None, (28, 28, 1))


def test_round_beyond_device_memory_names_batch_size_and_join_ratio():
  model = models.create_model('cnn', 10)
  per_example = preflight.activations_per_example(model, (28, 28, 1))
  assert per_example > 28 * 28  # at least the first conv layer's output
  config = Config(num_clients=20, batch_size=100)
  needed = 20 * 100 * per_example * 12
  preflight.check_round(config, np.full(20, 100), model, (28, 28, 1), memory_bytes=needed + 1)
  with pytest.raises(ConfigError, match='--batch_size=100 x 20 clients .*--join_ratio'):
    preflight.check_round(config, np.full(20, 100), model, (28, 28, 1), memory_bytes=needed - 1)


def test_missing_data_dir_is_refused_and_not_created(tmp_path):
  with pytest.raises(ConfigError, match='--data_dir'):
    datasets.load_dataset('fashion_mnist', tmp_path / 'nonexistent')
  assert not (tmp_path / 'nonexistent').exists()


# Through the real main.py, all started at once. (name, args, names the message must hold).
MAIN_CASES = [
  ('seed', ('--seed=-1',), ('--seed',)),
  ('num_clients', ('--num_clients=100000',), ('--num_clients',)),
  ('data_dir', ('--data_dir=/nonexistent/apfl_data',), ('--data_dir',)),
  ('unknown_flag', ('--num_clientz=3',), ('num_clientz', '--help')),
  ('cifar10_offline', ('--dataset=cifar10',), ('cifar10', 'pip install tensorflow')),
]
HELP_CASES = [('help', ('--help',), ())]


@pytest.fixture(scope='module')
def main_results(env):
  """Runs every MAIN_CASES and HELP_CASES command (each with a workdir of its own) at once."""

  def one(case):
    name, args, _ = case
    return name, run(env, *args, f'--workdir={env.root}/bad/{name}/run', timeout=300)

  cases = MAIN_CASES + HELP_CASES
  with futures.ThreadPoolExecutor(len(cases)) as pool:
    return dict(pool.map(one, cases))


@pytest.mark.slow
@pytest.mark.parametrize('name,args,names', MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_bad_input_is_one_line_and_leaves_no_workdir(env, main_results, name, args, names):
  del args
  result = main_results[name]
  assert_one_line_error(result.returncode, result.stderr, *names)
  assert not (env.root / 'bad' / name).exists()  # nor any folder made for the workdir
  assert not os.path.exists('/nonexistent/apfl_data')


@pytest.mark.slow
@pytest.mark.parametrize('name', [c[0] for c in HELP_CASES])
def test_help_lists_project_flags_by_component_and_exits_0(main_results, name):
  result = main_results[name]
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert (
    out.index('Data and partition:')
    < out.index('--num_clients')
    < out.index('Local training:')
    < out.index('--learning_rate')
    < out.index('Bookkeeping:')
    < out.index('--workdir')
  )
  assert '--fedprox_mu' in out and '--apfl_beta' in out


# ---------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_second_live_run_refused_then_kill_9_mid_round_then_resume(env, reference):
  workdir = env.root / 'kill9'
  runs = [start(env, *SMALL_RUN, f'--workdir={workdir}') for _ in range(2)]
  while all(p.poll() is None for p in runs):  # the one that finds the lock taken ends
    time.sleep(0.02)
  (refused,) = [p for p in runs if p.poll() is not None]
  (winner,) = [p for p in runs if p is not refused]
  assert_one_line_error(
    refused.returncode, refused.stderr.read(), '--workdir', 'in use', f'pid {winner.pid}'
  )
  wait_for_checkpoint(workdir, 1, winner)
  winner.kill()  # SIGKILL mid-round: no handler runs, the lock file stays behind
  assert winner.wait() == -signal.SIGKILL
  assert (workdir / 'run.lock').read_text().startswith(f'pid {winner.pid}')
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')  # takes over the stale lock
  assert resumed.returncode == 0, resumed.stderr
  assert read_rows(workdir) == reference.rows


@pytest.mark.slow
def test_sigint_and_sigterm_end_in_one_line_and_the_run_resumes(env, reference):
  workdir = env.root / 'interrupted'
  for sig in (signal.SIGINT, signal.SIGTERM):
    # A checkpoint this process writes: on a loaded machine the first run can save round 2
    # before SIGINT lands, and a signal sent before main() installs its handler kills the
    # process silently.
    saved = os.listdir(workdir / 'checkpoints') if (workdir / 'checkpoints').is_dir() else []
    step = 1 + max((int(name) for name in saved if name.isdigit()), default=0)
    # Far more rounds than the signal needs (num_rounds may change on resume), so that the
    # signal always lands mid-run: a 4-round run can finish before it arrives.
    process = start(env, *SMALL_RUN, f'--workdir={workdir}', '--num_rounds=10000')
    wait_for_checkpoint(workdir, step, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert_one_line_error(
      process.returncode, stderr, 'interrupted in round', f'--workdir={workdir}'
    )
    assert os.path.isdir(workdir / 'checkpoints' / str(step))  # nothing saved was lost
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  assert read_rows(workdir) == reference.rows


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(env, reference):
  workdir = copy_of_reference(env, reference, 'truncated_checkpoint', ROUNDS)
  victim = largest_file(workdir / 'checkpoints' / str(ROUNDS))
  os.truncate(victim, os.path.getsize(victim) // 2)
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  lines = resumed.stderr.strip().splitlines()
  assert len(lines) == 1 and f'checkpoint of round {ROUNDS} does not restore' in lines[0]
  assert 'Traceback' not in resumed.stderr
  assert read_rows(workdir) == reference.rows
  assert len(os.listdir(workdir / 'corrupt_checkpoints')) == 1  # kept for inspection


@pytest.mark.slow
def test_kill_mid_checkpoint_save_resumes_from_the_previous_one(env, reference):
  # What orbax leaves when the process dies while saving: the step's files, partly
  # written, in a temporary folder that is renamed to the step only once complete.
  workdir = copy_of_reference(env, reference, 'mid_save', ROUNDS - 1)
  partial = workdir / 'checkpoints' / f'{ROUNDS}.orbax-checkpoint-tmp-1'
  shutil.copytree(reference.workdir / 'checkpoints' / str(ROUNDS), partial)
  victim = largest_file(partial)
  os.truncate(victim, os.path.getsize(victim) // 2)
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  assert read_rows(workdir) == reference.rows


@pytest.mark.slow
def test_torn_last_metrics_line_is_repaired_on_resume(env, reference):
  workdir = copy_of_reference(env, reference, 'torn_metrics', ROUNDS - 1)
  last = (reference.workdir / 'metrics.jsonl').read_text().splitlines()[-1]
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write(last[: len(last) // 2])  # a kill while the last row was being written
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  assert 'torn last line' in resumed.stderr and len(resumed.stderr.strip().splitlines()) == 1
  assert read_rows(workdir) == reference.rows


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_checkpoints(env, reference):
  # /dev/full fails every write with ENOSPC, also for root (which a read-only chmod
  # would not stop): the resumed run's first write into the workdir goes there.
  workdir = copy_of_reference(env, reference, 'disk_full', ROUNDS - 1)
  os.symlink('/dev/full', workdir / 'metrics.jsonl.tmp')
  result = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert_one_line_error(result.returncode, result.stderr, '--workdir', 'No space left on device')
  assert os.path.isdir(workdir / 'checkpoints' / str(ROUNDS - 1))  # nothing saved is lost
  assert read_rows(workdir) == reference.rows[: ROUNDS - 1]


@pytest.mark.parametrize(
  'failure,flag',
  [
    (TrainingDivergedError('NaN/Inf in training at round 1, client 0'), 'round 1, client 0'),
    (
      jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 437GB'),
      '--batch_size',
    ),
  ],
)
def test_failure_in_round_1_leaves_nothing_it_created(tmp_path, monkeypatch, failure, flag):
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  monkeypatch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)

  def fail(*args):
    raise failure

  monkeypatch.setattr(drivers.SyncRounds, 'step', fail)
  config = Config(
    dataset='mnist',
    num_clients=4,
    min_samples_per_client=5,
    batch_size=8,
    num_rounds=2,
    verbose=False,
  )
  with pytest.raises(UserError, match=flag):
    train.train_and_evaluate(config, str(tmp_path / 'runs' / 'first'))
  assert not (tmp_path / 'runs').exists()  # neither the workdir nor the parent made for it
  mine = tmp_path / 'mine'  # a folder the user made: only what the run added goes
  mine.mkdir()
  (mine / 'notes.txt').write_text('x')
  with pytest.raises(UserError, match=flag):
    train.train_and_evaluate(config, str(mine))
  assert os.listdir(mine) == ['notes.txt']


@pytest.mark.parametrize('damage', ['truncate', 'flip_bytes'])
def test_corrupt_data_cache_is_rebuilt_with_one_warning(tmp_path, monkeypatch, caplog, damage):
  write_fake_fashion_mnist(tmp_path)
  cache = tmp_path / datasets.CACHE_DIRNAME / 'fashion_mnist-3.0.1-v1.npz'
  good = datasets.load_dataset('fashion_mnist', tmp_path)
  raw = bytearray(cache.read_bytes())
  if damage == 'truncate':
    raw = raw[: len(raw) // 2]  # BadZipFile
  else:
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # Bad CRC-32
  cache.write_bytes(bytes(raw))
  monkeypatch.setattr(datasets, '_read_tfds', lambda *args: good)  # the rebuild's source
  with caplog.at_level('WARNING'):
    rebuilt = datasets.load_dataset('fashion_mnist', tmp_path)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and str(cache) in warnings[0] and 'rebuilding' in warnings[0]
  np.testing.assert_array_equal(rebuilt.train_images, good.train_images)
  monkeypatch.undo()
  again = datasets.load_dataset('fashion_mnist', tmp_path)  # the rewritten cache reads
  np.testing.assert_array_equal(again.train_labels, good.train_labels)


def test_stale_lock_of_a_dead_process_is_taken_and_a_live_one_refused(tmp_path):
  (tmp_path / workdir_lib.LOCK_NAME).write_text('pid 999999\n')  # left by a killed run
  lock = workdir_lib.lock_workdir(str(tmp_path))
  assert (tmp_path / workdir_lib.LOCK_NAME).read_text() == f'pid {os.getpid()}\n'
  with pytest.raises(ConfigError, match=f'--workdir .* in use .*pid {os.getpid()}'):
    workdir_lib.lock_workdir(str(tmp_path))  # flock: a second open file conflicts, same process
  lock.close()
  workdir_lib.lock_workdir(str(tmp_path)).close()  # released with its file
