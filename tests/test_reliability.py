"""The README's reliability promise, tried as a user would: bad inputs and injected faults.

Bad inputs (at least 90; 152 here): each must end with a non-zero exit, one line (at most 2
for the absl-parsed mains) on stderr, no traceback, and the flag or file named, before any
work. Most are checked in-process against what main.py and the study scripts run
(`Config.validate`, `preflight`, `load_dataset`, `train_and_evaluate` on a bad workdir,
`read_metrics`, `compare.main`, `benchmark.main`); a representative subset runs the real
`python experiments/main.py`, all at once; the command lines of beta_sweep.py,
generator_study.py and plot_async.py run through their main() in one process per script.

Faults (at least 25; 41 here): each must end in a resumed run whose metrics equal the
uninterrupted run's (all but `elapsed_s`), or in a one-line error that loses nothing a
checkpoint held. They run main.py on a tiny Fashion-MNIST stand-in (10 classes, 120
training images, in a data dir that holds a prepared tfds folder stub and the
decoded-array cache, so nothing is decoded), 3 clients, 4 rounds of 2 local steps, with a
shared persistent jax compilation cache so that only the first subprocess compiles. The
real full disk mounts a tmpfs (root only; skipped where mounting is not allowed).
"""

from concurrent import futures
import importlib.util
import json
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
import orbax.checkpoint as ocp
import pytest
from test_train import read_rows

from apfl_jax import models
from apfl_jax.config import preflight
from apfl_jax.config.config import Config
from apfl_jax.core.errors import ConfigError, RunInterrupted, TrainingDivergedError, UserError
from apfl_jax.data import datasets
from apfl_jax.runner import checkpoints, drivers, run_folder, train
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
  # absl passes what is not a flag on as an argument: refused, not ignored.
  ('flagfile_line_without_dashes', ('--flagfile=bad_line.flags',), ('num_clients=0', '--name')),
  ('stray_argument', ('stray',), ("'stray'", '--name=value')),
  (
    'distributed_without_coordinator',
    ('--distributed',),
    ('--distributed', 'JAX_COORDINATOR_ADDRESS'),
  ),
]
HELP_CASES = [('help', ('--help',), ())]


@pytest.fixture(scope='module')
def main_results(env):
  """Runs every MAIN_CASES and HELP_CASES command (each with a workdir of its own) at once."""

  def one(case):
    name, args, _ = case
    return name, run(env, *args, f'--workdir={env.root}/bad/{name}/run', timeout=300)

  (env.root / 'bad_line.flags').write_text('--num_rounds=2\nnum_clients=0\n')
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
def test_sigint_sigterm_and_sighup_end_in_one_line_and_the_run_resumes(env, reference):
  workdir = env.root / 'interrupted'
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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


# ------------------------------------------------------------- checkpoints: checksums


def tiny_manager(folder):
  return ocp.CheckpointManager(os.path.abspath(folder))


def save_tiny(folder, step, tree, host, args=None):
  with tiny_manager(folder) as manager:
    manager.save(step, args=args or checkpoints.save_args(tree, host))
    manager.wait_until_finished()


TINY_TREE = {'w': np.arange(4096, dtype=np.float32).reshape(64, 64), 'b': np.ones(64, np.int32)}


@pytest.mark.parametrize('damage', ['flip_one_bit', 'xor_64_bytes', 'host_changed'])
def test_checksum_catches_what_a_read_does_not(tmp_path, damage):
  save_tiny(tmp_path, 1, TINY_TREE, {'clock': [1.5, 2]})
  if damage == 'host_changed':
    (tmp_path / '1' / 'host' / 'metadata').write_text('{"clock": [1.5, 3]}')
  else:
    victim = largest_file(tmp_path / '1' / 'state')
    raw = bytearray(open(victim, 'rb').read())
    middle = len(raw) // 2
    for i in range(1 if damage == 'flip_one_bit' else 64):
      raw[middle + i] ^= 0x01 if damage == 'flip_one_bit' else 0xFF
    open(victim, 'wb').write(bytes(raw))
  with tiny_manager(tmp_path) as manager:
    with pytest.raises(Exception) as error:  # noqa: PT011 -- any read error, checked below
      checkpoints.restore_step(manager, 1, TINY_TREE)
  assert checkpoints.is_read_error(error.value)


def test_checkpoint_without_a_checksum_still_restores(tmp_path):
  # As checkpoints saved before the checksum: items state and host only.
  old = ocp.args.Composite(
    **{
      checkpoints.STATE: ocp.args.StandardSave(TINY_TREE),
      checkpoints.HOST: ocp.args.JsonSave({'clock': [1]}),
    }
  )
  save_tiny(tmp_path, 3, None, None, args=old)
  assert not (tmp_path / '3' / checkpoints.CHECKSUM).exists()
  with tiny_manager(tmp_path) as manager:
    tree, host = checkpoints.restore_step(manager, 3, TINY_TREE)
  np.testing.assert_array_equal(tree['w'], TINY_TREE['w'])
  assert host == {'clock': [1]}


class FakeDriver:
  """A driver whose state is its device pytree (split/join do nothing)."""

  def split(self, tree):
    return tree, {}

  def join(self, device_tree, host):
    return device_tree


# (the error restore_step raises, whether it is the checkpoint's fault)
RESTORE_FAILURES = [
  (AttributeError("'Foo' object has no attribute 'bar'"), False),
  (TypeError('unsupported operand'), False),
  (NameError("name 'x' is not defined"), False),
  (ValueError('DATA_LOSS: Error reading ...'), True),
  (Exception('Encountered error while reading array index'), True),
  (checkpoints.ChecksumMismatch('the state differs from its checksum'), True),
  (FileNotFoundError(2, 'No such file or directory'), True),
]


@pytest.mark.parametrize(
  'failure,damaged', RESTORE_FAILURES, ids=[type(f).__name__ for f, _ in RESTORE_FAILURES]
)
def test_only_read_failures_move_a_checkpoint_aside(tmp_path, monkeypatch, failure, damaged):
  save_tiny(tmp_path / 'checkpoints', 1, TINY_TREE, {})
  save_tiny(tmp_path / 'checkpoints', 2, TINY_TREE, {})

  def restore(manager, step, template):
    if step == 2:
      raise failure
    return TINY_TREE, {}

  monkeypatch.setattr(checkpoints, 'restore_step', restore)
  with tiny_manager(tmp_path / 'checkpoints') as manager:
    if damaged:
      _, step = checkpoints.restore_newest_good(manager, FakeDriver(), TINY_TREE, str(tmp_path))
      assert step == 1 and len(os.listdir(tmp_path / 'corrupt_checkpoints')) == 1
    else:
      with pytest.raises(type(failure)):
        checkpoints.restore_newest_good(manager, FakeDriver(), TINY_TREE, str(tmp_path))
      assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # nothing moved
      assert not (tmp_path / 'corrupt_checkpoints').exists()


@pytest.mark.parametrize(
  'failure,one_line',
  [
    (
      ValueError(
        'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: Failed to write 1129798 '
        "bytes to file 8: No space left on device [os_error_code='28']"
      ),
      'No space left on device',
    ),
    (PermissionError(13, 'Permission denied'), 'Permission denied'),
  ],
)
def test_failed_checkpoint_write_is_one_line(tmp_path, failure, one_line):
  with pytest.raises(ConfigError, match=f'--workdir: cannot write a checkpoint .*{one_line}'):
    with checkpoints.write_errors(str(tmp_path)):
      raise failure
  with pytest.raises(KeyError):  # not a write failure: unchanged
    with checkpoints.write_errors(str(tmp_path)):
      raise KeyError('x')


# ------------------------------------------------------------- workdir bad inputs


def valid_config_values(**changes):
  return json.loads(Config(**changes).to_json())


def fake_checkpoint(workdir, step=2):
  (workdir / 'checkpoints' / str(step)).mkdir(parents=True)


def write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def config_json(content, checkpoint=True):
  def setup(workdir):
    write(workdir / 'config.json', content)
    if checkpoint:
      fake_checkpoint(workdir)

  return setup


def without(key):
  values = valid_config_values(dataset='mnist')
  del values[key]
  return values


def entry(name, kind):
  def setup(workdir):
    config_json(valid_config_values(dataset='mnist'), checkpoint=False)(workdir)
    path = workdir / name
    if kind == 'file':
      write(path, 'x')
    else:
      path.mkdir(parents=True)

  return setup


# (name, what the workdir holds, the config of the rerun's changes, names in the message).
WORKDIR_CASES = [
  ('config_empty_object', config_json({}), {}, ('config.json', 'lacks algorithm')),
  ('config_list', config_json([1, 2, 3]), {}, ('config.json', 'JSON list')),
  ('config_number', config_json(3), {}, ('config.json', 'JSON int')),
  ('config_null', config_json('null'), {}, ('config.json', 'JSON NoneType')),
  ('config_truncated', config_json('{"algorithm": "fed'), {}, ('config.json', 'not JSON')),
  ('config_empty', config_json(''), {}, ('config.json', 'empty')),
  ('config_binary', config_json(bytes(range(256))), {}, ('config.json', 'not JSON')),
  ('config_without_algorithm', config_json(without('algorithm')), {}, ('config.json', 'lacks')),
  ('config_without_dataset', config_json(without('dataset')), {}, ('config.json', 'dataset')),
  ('config_damaged_no_checkpoint', config_json('{', checkpoint=False), {}, ('config.json',)),
  ('checkpoints_without_config', fake_checkpoint, {}, ('--workdir', 'no config.json')),
  (
    'finished_run_whose_checkpoints_were_deleted',
    lambda w: [
      config_json(valid_config_values(dataset='mnist'), checkpoint=False)(w),
      write(w / 'summary.json', {}),
    ],
    {'algorithm': 'fedprox'},
    ('--algorithm=fedavg', '--algorithm=fedprox'),
  ),
  (
    'other_algorithm',
    config_json(valid_config_values(dataset='mnist')),
    {'algorithm': 'fedprox'},
    ('--algorithm=fedavg', '--algorithm=fedprox'),
  ),
  (
    'num_rounds_below_the_newest_checkpoint',
    config_json(valid_config_values(dataset='mnist', num_rounds=4)),
    {'num_rounds': 1},
    ('--num_rounds=1', 'round 2'),
  ),
  ('checkpoints_is_a_file', entry('checkpoints', 'file'), {}, ('--workdir', 'checkpoints')),
  ('tensorboard_is_a_file', entry('tensorboard', 'file'), {}, ('--workdir', 'tensorboard')),
  ('corrupt_is_a_file', entry('corrupt_checkpoints', 'file'), {}, ('corrupt_checkpoints',)),
  ('run_lock_is_a_folder', entry('run.lock', 'folder'), {}, ('--workdir', 'run.lock')),
  ('metrics_is_a_folder', entry('metrics.jsonl', 'folder'), {}, ('--workdir', 'metrics.jsonl')),
  ('summary_is_a_folder', entry('summary.json', 'folder'), {}, ('--workdir', 'summary.json')),
  ('partition_is_a_folder', entry('partition.json', 'folder'), {}, ('partition.json',)),
  ('workdir_is_a_file', lambda w: write(w, 'x'), {}, ('--workdir', 'is a file')),
  ('workdir_under_a_file', lambda w: write(w.parent, 'x'), {}, ('--workdir', 'Not a directory')),
]


@pytest.mark.parametrize(
  'name,setup,changes,names', WORKDIR_CASES, ids=[c[0] for c in WORKDIR_CASES]
)
def test_workdir_that_cannot_be_a_run_is_one_line_and_untouched(
  tmp_path, name, setup, changes, names
):
  workdir = tmp_path / 'parent' / 'run'
  setup(workdir)
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(Config(dataset='mnist', **changes), str(workdir))
  message = str(error.value)
  assert '\n' not in message
  for expected in names:
    assert expected in message, message
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before  # nothing made or removed


# ------------------------------------------------------------- metrics.jsonl bad inputs

GOOD_ROWS = '{"round": 1, "personalized_acc": 0.5}\n{"round": 2, "personalized_acc": 0.6}\n'
METRICS_CASES = [
  ('binary_garbage', os.urandom(64).replace(b'\n', b'x') + b'\n' + GOOD_ROWS.encode(), 1),
  ('binary_only_line', b'\x00\xff\xfe' + os.urandom(61).replace(b'\n', b'x'), 1),
  ('binary_last_line', GOOD_ROWS.encode() + b'\x89PNG\r\x1a\x00', 3),
  ('row_without_round', '{"personalized_acc": 0.5}\n' + GOOD_ROWS, 1),
  ('bare_number', '3\n' + GOOD_ROWS, 1),
  ('list_row', GOOD_ROWS + '[1, 2]\n', 3),
  ('null_row', 'null\n' + GOOD_ROWS, 1),
  ('round_as_text', '{"round": "1"}\n' + GOOD_ROWS, 1),
  ('text_garbage_in_the_middle', '{"round": 1}\nhello\n{"round": 3}\n', 2),
]


@pytest.mark.parametrize('name,content,line', METRICS_CASES, ids=[c[0] for c in METRICS_CASES])
def test_unreadable_metrics_line_is_one_line_naming_file_and_line(tmp_path, name, content, line):
  write(tmp_path / 'metrics.jsonl', content)
  with pytest.raises(ConfigError, match=f'line {line} of .*metrics.jsonl') as error:
    run_folder.read_metrics(str(tmp_path), 2)
  assert '\n' not in str(error.value)


def test_torn_last_metrics_line_is_dropped_also_inside_a_character(tmp_path):
  write(tmp_path / 'metrics.jsonl', GOOD_ROWS.encode() + '{"round": 3, "x": "é'.encode()[:-1])
  assert [r['round'] for r in run_folder.read_metrics(str(tmp_path))] == [1, 2]


# ------------------------------------------------------------- failures before round 1


def test_out_of_memory_placing_the_data_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  def place(config):
    raise MemoryError('std::bad_alloc')

  monkeypatch.setattr(train, 'build_experiment', place)
  with pytest.raises(ConfigError, match='--dataset=mnist: out of memory while placing') as e:
    train.train_and_evaluate(Config(dataset='mnist', verbose=False), str(tmp_path / 'runs' / 'a'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('num_rounds', [1, 3])
def test_interrupt_names_the_round_that_was_running(tmp_path, monkeypatch, num_rounds):
  dataset = make_synthetic_dataset(num_classes=4, per_class=20, shape=(28, 28, 1))
  monkeypatch.setattr(datasets, 'load_dataset', lambda name, data_dir=None: dataset)

  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(drivers.SyncRounds, 'step', interrupted)
  config = Config(
    dataset='mnist', num_clients=4, min_samples_per_client=5, batch_size=8, verbose=False
  )
  with pytest.raises(RunInterrupted, match=f'interrupted in round 1/{num_rounds}: nothing'):
    train.train_and_evaluate(config.replace(num_rounds=num_rounds), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------- faults through main.py


def wait_for_metrics(workdir, process, timeout=120):
  """Waits until round 1's metrics row is written (the run has started, not checkpointed)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while not (os.path.exists(path) and os.path.getsize(path) > 0):
    assert process.poll() is None, process.stderr.read()
    assert time.time() < deadline, f'no metrics row in {timeout} s'
    time.sleep(0.02)


def damage_middle(path, count):
  """Flips the lowest bit of one byte (count=1), or XORs `count` bytes, mid-file."""
  raw = bytearray(open(path, 'rb').read())
  middle = len(raw) // 2
  for i in range(count):
    raw[middle + i] ^= 0x01 if count == 1 else 0xFF
  open(path, 'wb').write(bytes(raw))


@pytest.mark.slow
@pytest.mark.parametrize('count', [1, 64], ids=['flip_one_bit', 'xor_64_bytes'])
def test_damaged_checkpoint_bytes_fall_back_to_the_previous_one(env, reference, count):
  # Such damage still reads back: only the checksum saved with the checkpoint catches it.
  workdir = copy_of_reference(env, reference, f'damaged_{count}', ROUNDS)
  damage_middle(largest_file(workdir / 'checkpoints' / str(ROUNDS) / 'state'), count)
  resumed = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  lines = resumed.stderr.strip().splitlines()
  assert len(lines) == 1 and f'checkpoint of round {ROUNDS} does not restore' in lines[0]
  assert read_rows(workdir) == reference.rows
  assert len(os.listdir(workdir / 'corrupt_checkpoints')) == 1


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_allows_a_retry_with_other_flags(env, reference):
  workdir = env.root / 'killed_start'
  # A mistaken start (another learning rate) that checkpoints only at round 1000.
  mistaken = ('--learning_rate=0.04', '--checkpoint_every=1000', '--num_rounds=10000')
  process = start(env, *SMALL_RUN, f'--workdir={workdir}', *mistaken)
  wait_for_metrics(workdir, process)
  process.send_signal(signal.SIGHUP)  # a closed terminal: as SIGTERM, one line
  _, stderr = process.communicate(timeout=60)
  assert_one_line_error(process.returncode, stderr, 'interrupted in round', 'nothing was')
  assert not workdir.exists()  # the failed start removed what it made
  process = start(env, *SMALL_RUN, f'--workdir={workdir}', *mistaken)
  wait_for_metrics(workdir, process)
  process.kill()  # no handler runs: config.json, metrics.jsonl, tensorboard/ stay
  process.wait()
  assert (workdir / 'config.json').exists() and not workdir_lib.has_checkpoint(str(workdir))
  retried = run(env, *SMALL_RUN, f'--workdir={workdir}')
  assert retried.returncode == 0, retried.stderr
  assert read_rows(workdir) == reference.rows
  assert len(os.listdir(workdir / 'tensorboard')) == 1  # the killed start's events went


@pytest.mark.slow
def test_sighup_before_the_run_starts_is_one_line(env):
  process = start(env, *SMALL_RUN, f'--workdir={env.root}/early_hup')
  time.sleep(0.3)  # importing jax and the project: no handler of main() yet
  process.send_signal(signal.SIGHUP)
  _, stderr = process.communicate(timeout=60)
  assert_one_line_error(process.returncode, stderr, 'SIGHUP')
  assert not (env.root / 'early_hup').exists()


@pytest.mark.slow
def test_workdir_removed_mid_run_or_holding_a_file_for_a_folder_is_one_line(env):
  workdir = env.root / 'removed'
  process = start(env, *SMALL_RUN, f'--workdir={workdir}', '--num_rounds=10000')
  wait_for_checkpoint(workdir, 1, process)
  while workdir.exists():
    shutil.rmtree(workdir, ignore_errors=True)
  _, stderr = process.communicate(timeout=60)
  assert_one_line_error(process.returncode, stderr, '--workdir')
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('')  # orbax would fail on it, then hang at exit
  result = run(env, *SMALL_RUN, f'--workdir={workdir}', timeout=60)
  assert_one_line_error(result.returncode, result.stderr, '--workdir', 'checkpoints')


@pytest.mark.slow
def test_closed_or_full_stdout_does_not_stop_the_run(env, reference):
  verbose = [arg for arg in SMALL_RUN if arg != '--noverbose']
  closed = env.root / 'stdout_closed'
  piped = subprocess.Popen(
    command(env, *verbose, f'--workdir={closed}'),
    cwd=env.root,
    env=env.variables,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert piped.stdout.readline().startswith('loading')
  piped.stdout.close()  # as `| head -1` does
  results = [(piped.wait(timeout=180), piped.stderr.read(), closed)]
  full = env.root / 'stdout_full'
  with open('/dev/full', 'w') as sink:
    result = subprocess.run(
      command(env, *verbose, f'--workdir={full}'),
      cwd=env.root,
      env=env.variables,
      stdout=sink,
      stderr=subprocess.PIPE,
      text=True,
      timeout=180,
    )
  results.append((result.returncode, result.stderr, full))
  for returncode, stderr, workdir in results:
    assert returncode == 0, stderr
    assert len(stderr.strip().splitlines()) <= 1 and 'Traceback' not in stderr, stderr
    assert read_rows(workdir) == reference.rows


def mount_tmpfs(path, kilobytes):
  path.mkdir()
  if os.geteuid() != 0:
    pytest.skip('mounting a tmpfs needs root')
  result = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', f'size={kilobytes}k', 'tmpfs', str(path)],
    capture_output=True,
    text=True,
  )
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')


@pytest.mark.slow
def test_real_full_disk_is_one_line_fresh_and_on_resume(env, reference):
  fresh = env.root / 'tmpfs_fresh'
  mount_tmpfs(fresh, 1024)  # 1 MB: config.json and metrics fit, a checkpoint does not
  try:
    result = run(env, *SMALL_RUN, f'--workdir={fresh}/run')
    assert_one_line_error(result.returncode, result.stderr, '--workdir', 'No space left')
    assert os.listdir(fresh) == []  # the failed start removed what it made
  finally:
    subprocess.run(['umount', str(fresh)], check=True)
  source = copy_of_reference(env, reference, 'tmpfs_source', ROUNDS - 1)
  used = sum(os.path.getsize(p) for p in source.rglob('*') if p.is_file()) // 1024
  full = env.root / 'tmpfs_resume'
  mount_tmpfs(full, used + 512)  # room for what the run holds, not for one more checkpoint
  try:
    shutil.copytree(source, full / 'run')
    result = run(env, *SMALL_RUN, f'--workdir={full}/run')
    assert_one_line_error(result.returncode, result.stderr, '--workdir', 'No space left')
    kept = full / 'run' / 'checkpoints' / str(ROUNDS - 1)
    for path in (source / 'checkpoints' / str(ROUNDS - 1)).rglob('*'):
      if path.is_file():
        assert (kept / path.relative_to(source / 'checkpoints' / str(ROUNDS - 1))).read_bytes() == (
          path.read_bytes()
        )
    shutil.copytree(full / 'run', env.root / 'tmpfs_after', ignore=shutil.ignore_patterns('*tmp*'))
  finally:
    subprocess.run(['umount', str(full)], check=True)
  resumed = run(env, *SMALL_RUN, f'--workdir={env.root}/tmpfs_after')  # on a disk with room
  assert resumed.returncode == 0, resumed.stderr
  assert read_rows(env.root / 'tmpfs_after') == reference.rows


# ------------------------------------------------------------- study scripts: bad inputs


def one_line_naming(code, message, names):
  assert code not in (0, None), message
  assert 'Traceback' not in message, message
  assert len(message.strip().splitlines()) == 1, message
  for name in names:
    assert name in message, message


# (name, arguments; {out} and {file} are replaced, the names the message must hold).
COMPARE_CASES = [
  ('algorithms_repeated', ('--algorithms=fedavg,fedavg',), ('--algorithms', 'fedavg')),
  ('algorithms_empty', ('--algorithms=',), ('--algorithms is empty',)),
  ('algorithms_unknown', ('--algorithms=fedfoo',), ('--algorithms', 'fedfoo')),
  ('seeds_repeated', ('--seeds=0,1,0',), ('--seeds', '0')),
  ('seeds_not_integers', ('--seeds=a',), ('--seeds',)),
  ('seeds_empty', ('--seeds=',), ('--seeds',)),
  ('sweep_repeated', ('--algorithms=apfl', '--sweep=apfl_beta:0.1,0.1'), ('--sweep',)),
  ('sweep_unknown_flag', ('--sweep=bogus:1',), ('--sweep',)),
  ('sweep_bad_value', ('--sweep=apfl_beta:x',), ('--sweep', 'apfl_beta')),
  ('algorithm_flags_bad', ('--algorithm_flags=fedavg.bogus=1',), ('--algorithm_flags',)),
  ('out_missing', ('--out=',), ('--out',)),
  ('out_is_a_file', ('--out={file}',), ('--out', 'is a file')),
  ('out_under_a_file', ('--out={file}/sub',), ('--out',)),
  ('stray_argument', ('stray',), ("'stray'",)),
  ('invalid_run_flag', ('--num_clients=0',), ('--num_clients',)),
  ('unknown_flag', ('--bogus=1',), ('bogus',)),
]


@pytest.mark.parametrize('name,args,names', COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_bad_input_is_one_line_before_any_run(tmp_path, name, args, names):
  from absl import flags

  from apfl_jax.studies import compare

  (tmp_path / 'file').write_text('x')
  out = tmp_path / 'out'
  argv = [a.format(out=out, file=tmp_path / 'file') for a in args]
  if not any(a.startswith('--out=') for a in argv):
    argv.append(f'--out={out}')
  with pytest.raises((UserError, flags.Error)) as error:
    compare.main(['compare.py', '--algorithms=fedavg', '--seeds=0', *argv])
  one_line_naming(1, f'error: {error.value}', names)
  assert not out.exists()  # refused before any run


def test_compare_whose_every_run_fails_exits_non_zero_with_the_table(env, tmp_path):
  from apfl_jax.studies import compare

  with pytest.raises(UserError, match='every run failed .*--num_clients') as error:
    compare.main(
      [
        'compare.py',
        '--algorithms=fedavg,local',
        '--seeds=0',
        f'--data_dir={env.data}',
        '--dataset=fashion_mnist',
        '--num_clients=100000',
        f'--out={tmp_path}',
      ]
    )
  assert '\n' not in str(error.value)
  assert 'failed' in (tmp_path / 'results.md').read_text()


# Runs each command line of a study script in one process: its main(), as absl's app.run
# calls it, with the flags reset between cases. Prints [exit code, stderr] per case.
CLI_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
from absl import flags
script, cases = sys.argv[1], json.loads(sys.argv[2])
if script.endswith('plot_async.py'):
  from apfl_jax.studies import async_curves
  async_curves.define_flags()
  main = async_curves.main
else:
  main = runpy.run_path(script, run_name='cli')['main']
results = []
for argv in cases:
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      main(flags.FLAGS([script, *argv]))
    results.append([0, err.getvalue()])
  except SystemExit as e:
    text = e.code if isinstance(e.code, str) else ''
    results.append([e.code if isinstance(e.code, int) else 1, text + err.getvalue()])
  except flags.Error as e:
    results.append([1, f'error: {e}'])
  except Exception:
    results.append([99, err.getvalue() + traceback.format_exc()])
print(json.dumps(results))
"""


def write_run_folder(workdir, algorithm='apfl', rows=None, config=None):
  workdir.mkdir(parents=True)
  values = valid_config_values(algorithm=algorithm) if config is None else config
  write(workdir / 'config.json', values)
  rows = rows if rows is not None else [{'round': 1, 'virtual_time': 1.0, 'personalized_acc': 0.5}]
  write(workdir / 'metrics.jsonl', ''.join(json.dumps(r) + '\n' for r in rows))


@pytest.fixture(scope='module')
def study_folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('studies')
  write_run_folder(root / 'apfl' / 'seed0')
  write_run_folder(root / 'fedavg' / 'seed0', algorithm='fedavg')
  (root / 'empty').mkdir()
  (root / 'file').write_text('x')
  (root / 'folder').mkdir()
  write_run_folder(root / 'no_time' / 'seed0', rows=[{'round': 1, 'personalized_acc': 0.5}])
  write_run_folder(root / 'list_config' / 'seed0', config=[1])
  write_run_folder(root / 'garbage' / 'seed0')
  write(root / 'garbage' / 'seed0' / 'metrics.jsonl', b'\x00\xff\n\x89PNG\n')
  return root


SWEEP_CASES = [
  ('out_missing', ('--runs={apfl}',), ('--out',)),
  ('out_is_a_folder', ('--runs={apfl}', '--out={folder}'), ('--out', 'is a folder')),
  ('out_under_a_file', ('--runs={apfl}', '--out={file}/x.md'), ('--out',)),
  ('betas_repeated', ('--runs={apfl}', '--out={out}', '--betas=0.1,0.1'), ('--betas',)),
  ('betas_out_of_range', ('--runs={apfl}', '--out={out}', '--betas=1.5'), ('--betas',)),
  ('betas_not_numbers', ('--runs={apfl}', '--out={out}', '--betas=x'), ('--betas',)),
  ('seeds_repeated', ('--runs={apfl}', '--out={out}', '--seeds=0,0'), ('--seeds',)),
  ('seeds_missing', ('--runs={apfl}', '--out={out}', '--seeds=7'), ('--seeds', 'seed7')),
  ('seeds_not_integers', ('--runs={apfl}', '--out={out}', '--seeds=x'), ('--seeds',)),
  ('runs_without_seeds', ('--runs={empty}', '--out={out}'), ('--runs',)),
  ('friend_setting_unknown', ('--runs={apfl}', '--out={out}', '--friend_settings=a=1'), ('a=1',)),
  ('stray_argument', ('--runs={apfl}', '--out={out}', 'stray'), ("'stray'",)),
  ('not_an_apfl_run', ('--runs={fedavg}', '--out={out}'), ('--runs', 'fedavg')),
]
GENERATOR_CASES = [
  ('out_missing', ('--runs={apfl}',), ('--out',)),
  ('out_is_a_folder', ('--runs={apfl}', '--out={folder}'), ('--out', 'is a folder')),
  ('setting_unknown', ('--runs={apfl}', '--out={out}', '--generator_settings=x=1'), ('x=1',)),
  ('betas_out_of_range', ('--runs={apfl}', '--out={out}', '--betas=2'), ('--betas',)),
  ('stray_argument', ('--runs={apfl}', '--out={out}', 'stray'), ("'stray'",)),
  ('not_an_apfl_run', ('--runs={fedavg}', '--out={out}'), ('--runs', 'fedavg')),
]
PLOT_ASYNC_CASES = [
  ('runs_missing', ('--out={out}',), ('--runs',)),
  ('out_is_a_file', ('--runs={apfl}', '--out={file}'), ('--out', 'is a file')),
  ('out_under_a_file', ('--runs={apfl}', '--out={file}/sub'), ('--out',)),
  ('target_above_1', ('--runs={apfl}', '--out={out}', '--target=2'), ('--target',)),
  ('runs_repeated', ('--runs={apfl},{apfl}', '--out={out}'), ('--runs',)),
  ('runs_not_there', ('--runs={empty}/none', '--out={out}'), ('--runs',)),
  ('metric_not_logged', ('--runs={apfl}', '--out={out}', '--metric=bogus'), ('--metric',)),
  ('metrics_garbage', ('--runs={garbage}', '--out={out}'), ('metrics.jsonl', 'line 1')),
  ('config_a_list', ('--runs={list_config}', '--out={out}'), ('config.json',)),
  ('rows_without_time', ('--runs={no_time}', '--out={out}'), ('--runs', 'virtual_time')),
  ('stray_argument', ('--runs={apfl}', '--out={out}', 'stray'), ("'stray'",)),
]
CLI_TABLES = {
  'beta_sweep.py': SWEEP_CASES,
  'generator_study.py': GENERATOR_CASES,
  'plot_async.py': PLOT_ASYNC_CASES,
}


@pytest.fixture(scope='module')
def cli_results(env, study_folders):
  """Every CLI_TABLES case, one process per script (all three at once)."""

  def one(script):
    names = {p.name: p for p in study_folders.iterdir()}
    cases = [
      [a.format(out=study_folders / 'out' / script, **names) for a in args]
      for _, args, _ in CLI_TABLES[script]
    ]
    result = subprocess.run(
      [sys.executable, '-c', CLI_DRIVER, os.path.join(REPO, 'experiments', script)]
      + [json.dumps(cases)],
      cwd=env.root,
      env=env.variables,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return script, json.loads(result.stdout.strip().splitlines()[-1])

  with futures.ThreadPoolExecutor(len(CLI_TABLES)) as pool:
    return dict(pool.map(one, CLI_TABLES))


@pytest.mark.slow
@pytest.mark.parametrize(
  'script,name,names',
  [(s, c[0], c[2]) for s, table in CLI_TABLES.items() for c in table],
  ids=[f'{s}-{c[0]}' for s, table in CLI_TABLES.items() for c in table],
)
def test_study_script_bad_input_is_one_line_before_the_work(
  cli_results, study_folders, script, name, names
):
  index = [c[0] for c in CLI_TABLES[script]].index(name)
  code, message = cli_results[script][index]
  one_line_naming(code, message, names)
  assert not (study_folders / 'out' / script).exists()  # nothing written


def load_benchmark():
  spec = importlib.util.spec_from_file_location(
    'benchmark', os.path.join(REPO, 'experiments', 'benchmark.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BENCHMARK_CASES = [
  ('rounds_0', ('--rounds=0',), ('--rounds',)),
  ('rounds_negative', ('--rounds=-3',), ('--rounds',)),
  ('rounds_not_a_number', ('--rounds=x',), ('--rounds',)),
  ('conv_impl_unknown', ('--conv_impl=bogus',), ('--conv_impl', 'bogus')),
  ('device_gpu_without_one', ('--device=gpu',), ('--device=gpu',)),
  ('device_unknown', ('--device=tpu',), ('--device',)),
  ('preset_unknown', ('--preset=huge',), ('--preset',)),
  ('compute_dtype_unknown', ('--compute_dtype=float16',), ('--compute_dtype',)),
  ('backends_empty', ('--backends=',), ('--backends',)),
  ('backends_unknown', ('--backends=tf',), ('--backends', 'tf')),
  ('backends_repeated', ('--backends=jax_vmap,jax_vmap',), ('--backends',)),
  ('max_clients_negative', ('--max_clients=-1',), ('--max_clients',)),
  ('max_clients_below_every_config', ('--max_clients=1',), ('--max_clients=1',)),
  ('client_chunk_size_below_minus_1', ('--client_chunk_size=-2',), ('--client_chunk_size',)),
  ('json_is_a_folder', ('--json={folder}',), ('--json', 'is a folder')),
  ('json_under_a_file', ('--json={file}/x.json',), ('--json',)),
  ('stray_argument', ('stray',), ('stray',)),
]


@pytest.mark.parametrize('name,args,names', BENCHMARK_CASES, ids=[c[0] for c in BENCHMARK_CASES])
def test_benchmark_bad_input_is_one_line_before_any_worker(
  tmp_path, monkeypatch, capsys, name, args, names
):
  benchmark = load_benchmark()
  if name == 'device_gpu_without_one' and benchmark.has_nvidia_gpu():
    pytest.skip('this machine has an NVIDIA GPU')
  (tmp_path / 'file').write_text('x')
  (tmp_path / 'folder').mkdir()

  def no_worker(*args):
    raise AssertionError('a worker started')

  monkeypatch.setattr(benchmark, 'run_backend_subprocess', no_worker)
  argv = [a.format(folder=tmp_path / 'folder', file=tmp_path / 'file') for a in args]
  with pytest.raises(SystemExit) as exit_:
    benchmark.main(['--preset=small', '--backends=jax_vmap', *argv])
  captured = capsys.readouterr()
  one_line_naming(1, f'{exit_.value.code}{captured.err}', names)


def test_benchmark_conv_impls_match_the_models():
  from apfl_jax.models import conv

  assert load_benchmark().CONV_IMPLS == conv.CONV_IMPLS


@pytest.mark.slow
def test_main_with_several_seeds_trains_them_as_one_program(env, reference):
  """`main.py --seeds=0,1`: seed k in <workdir>/seed<k>; seed 0 equals the plain run."""
  workdir = env.root / 'seeds'
  result = run(env, *SMALL_RUN, '--seeds=0,1', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  for seed in (0, 1):
    config = json.loads((workdir / f'seed{seed}' / 'config.json').read_text())
    assert config['seed'] == seed
  rows = read_rows(workdir / 'seed0')
  assert [r['round'] for r in rows] == [r['round'] for r in reference.rows]
  for row, expected in zip(rows, reference.rows):
    assert row['personalized_acc'] == pytest.approx(expected['personalized_acc'], abs=1e-6)
    assert row['train_loss'] == pytest.approx(expected['train_loss'], rel=1e-5)
  bad = run(env, *SMALL_RUN, '--seeds=0,x', f'--workdir={workdir}_bad')
  assert_one_line_error(bad.returncode, bad.stderr, '--seeds')
