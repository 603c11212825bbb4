"""Multi-process runs on one machine: 2 processes on localhost, 1 CPU device each.

Each job starts `experiments/main.py --distributed` twice (JAX_COORDINATOR_ADDRESS on a
free loopback port, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=0/1, JAX_NUM_CPU_DEVICES=1;
jax's CPU collectives are gloo), with one shared workdir and data dir, and kills both
by pid if either outlives the job's timeout. The jobs must write what a single process
writes with the same flags: each metrics.jsonl row once, and the same values (the
2-process round splits the cohort over 2 devices, so the server's weighted mean adds
the clients in another order: train_loss and the accuracies may differ in the last
bits, hence `TOLERANCE`). A failure in one process must end both within 60 s with
one line each, naming the process that failed.

The runs share a persistent compilation cache and compile with XLA's cheaper backend
passes (tests/test_multihost.py takes about 2 minutes on 2 idle cores).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest
from test_reliability import largest_file, write_fake_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'experiments', 'main.py')
# Relative tolerance of float metrics between the 2-process and the 1-process run.
TOLERANCE = 1e-5
JOB_TIMEOUT_S = 240
RUN = (
  '--dataset=fashion_mnist',
  '--num_clients=3',
  '--partition=dirichlet',
  '--dirichlet_alpha=1',
  '--min_samples_per_client=5',
  '--local_epochs=0',
  '--local_steps=2',
  '--batch_size=8',
  '--learning_rate=0.05',
  '--checkpoint_every=1',
  '--num_devices=0',
  '--distributed_timeout_s=10',
  '--noverbose',
)
APFL = (
  '--algorithm=apfl',
  '--embedding=onehot',
  '--generator=feature',
  '--noise_dim=8',
  '--generator_hidden_dim=16',
  '--generator_steps=2',
  '--generator_batch_size=8',
  '--apfl_synthetic_per_class=4',
  '--apfl_friend_batch_size=8',
)
# Process 1 of the failure test: main.py with a TrainingDivergedError in round 2.
FAILING_MAIN = f"""
import runpy, sys
from apfl_jax.core.errors import TrainingDivergedError
from apfl_jax.runner import drivers

original = drivers.cohort_for_round

def failing(seed, round_index, *args, **kwargs):
  if round_index == 2:
    raise TrainingDivergedError('injected failure in round 2')
  return original(seed, round_index, *args, **kwargs)

drivers.cohort_for_round = failing
sys.argv[0] = {MAIN!r}
runpy.run_path({MAIN!r}, run_name='__main__')
"""


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  write_fake_fashion_mnist(root / 'data')
  (root / 'failing_main.py').write_text(FAILING_MAIN)
  variables = dict(
    os.environ,
    PYTHONPATH=REPO,
    JAX_PLATFORMS='cpu',
    JAX_NUM_CPU_DEVICES='1',
    JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    # Compiles about a third faster; the same in the 1- and the 2-process runs.
    XLA_FLAGS='--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true',
  )
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    variables.pop(name, None)
  return types.SimpleNamespace(root=root, data=root / 'data', variables=variables)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def job(env, *args, scripts=(MAIN, MAIN), timeout=JOB_TIMEOUT_S):
  """Runs one process per script as one job; returns (exit codes, stderrs, seconds)."""
  port = free_port()
  processes = []
  for index, script in enumerate(scripts):
    variables = dict(
      env.variables,
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
      JAX_NUM_PROCESSES=str(len(scripts)),
      JAX_PROCESS_ID=str(index),
    )
    processes.append(
      subprocess.Popen(
        [sys.executable, script, f'--data_dir={env.data}', '--distributed', *args],
        cwd=env.root,
        env=variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  start = time.monotonic()
  try:
    stderrs = [
      p.communicate(timeout=max(1, timeout - (time.monotonic() - start)))[1] for p in processes
    ]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in processes], stderrs, time.monotonic() - start


def start_single(env, *args):
  """Starts the single-process run of `args` (it runs beside the 2-process job)."""
  return subprocess.Popen(
    [sys.executable, MAIN, f'--data_dir={env.data}', *args],
    cwd=env.root,
    env=env.variables,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def single_rows(process, *args):
  try:
    stderr = process.communicate(timeout=JOB_TIMEOUT_S)[1]
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 0, stderr
  return rows_of(args)


def rows_of(args):
  workdir = next(a.split('=', 1)[1] for a in args if a.startswith('--workdir='))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    row.pop('elapsed_s')
  return rows


def assert_same_rows(rows, expected):
  assert [r['round'] for r in rows] == [r['round'] for r in expected]
  for row, want in zip(rows, expected):
    assert row.keys() == want.keys()
    for key, value in want.items():
      assert row[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (row['round'], key)


def assert_job_ok(codes, stderrs):
  assert codes == [0, 0], stderrs


@pytest.mark.slow
def test_two_processes_write_one_run_equal_to_one_process_and_resume(env):
  """FedAvg: 2 rounds as a 2-process job, resumed to 4 past a truncated checkpoint, against
  one process's 4 rounds."""
  reference = (*RUN, '--num_rounds=4', f'--workdir={env.root / "fedavg_single"}')
  process = start_single(env, *reference)
  workdir = env.root / 'fedavg_two'
  assert_job_ok(*job(env, *RUN, '--num_rounds=2', f'--workdir={workdir}')[:2])
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  # Round 2's checkpoint is truncated: both processes find it, process 0 moves it aside
  # once, and the job resumes from round 1.
  victim = largest_file(workdir / 'checkpoints' / '2')
  os.truncate(victim, os.path.getsize(victim) // 2)
  codes, stderrs, _ = job(env, *RUN, '--num_rounds=4', f'--workdir={workdir}')
  assert_job_ok(codes, stderrs)
  assert 'checkpoint of round 2 does not restore' in stderrs[0]
  assert 'does not restore' not in stderrs[1]
  assert len(os.listdir(workdir / 'corrupt_checkpoints')) == 1
  assert_same_rows(rows_of([f'--workdir={workdir}']), single_rows(process, *reference))
  # One set of files, written by process 0 alone; one orbax checkpoint per round.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '4']
  assert len(os.listdir(workdir / 'tensorboard')) == 2  # one events file per job
  leftovers = [n for n in os.listdir(workdir) if 'tmp' in n or n.startswith('.write_test')]
  assert not leftovers


@pytest.mark.slow
def test_two_processes_equal_one_process_apfl(env):
  flags = (*RUN, *APFL, '--num_rounds=3')
  reference = (*flags, f'--workdir={env.root / "apfl_single"}')
  process = start_single(env, *reference)
  workdir = env.root / 'apfl_two'
  assert_job_ok(*job(env, *flags, f'--workdir={workdir}')[:2])
  assert_same_rows(rows_of([f'--workdir={workdir}']), single_rows(process, *reference))


@pytest.mark.slow
def test_failure_in_one_process_ends_both_with_one_line_each(env):
  workdir = env.root / 'failing'
  codes, stderrs, seconds = job(
    env,
    *RUN,
    '--num_rounds=4',
    f'--workdir={workdir}',
    scripts=(MAIN, str(env.root / 'failing_main.py')),
    timeout=120,
  )
  assert codes[0] != 0 and codes[1] != 0, stderrs
  assert seconds < 60, (seconds, stderrs)
  for index, stderr in enumerate(stderrs):
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, stderr
    assert f'process {index} of 2' in errors[0]
    assert 'process 1' in errors[0] and 'injected failure in round 2' in errors[0], stderr
    assert 'Traceback' not in stderr, stderr


def test_distributed_without_a_coordinator_is_one_line(env):
  start = time.monotonic()
  result = subprocess.run(
    [sys.executable, MAIN, f'--data_dir={env.data}', '--distributed', *RUN],
    cwd=env.root,
    env=env.variables,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert time.monotonic() - start < 60
  assert result.returncode != 0
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert result.stderr.startswith('error: --distributed'), result.stderr


def test_coordinator_that_never_answers_is_one_line(env):
  start = time.monotonic()
  result = subprocess.run(
    [
      sys.executable,
      MAIN,
      f'--data_dir={env.data}',
      '--distributed',
      *RUN,
      '--distributed_timeout_s=3',
    ],
    cwd=env.root,
    env=dict(
      env.variables,
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{free_port()}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID='1',
    ),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert time.monotonic() - start < 60
  assert result.returncode != 0
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'did not answer' in result.stderr and '--distributed_timeout_s=3' in result.stderr


# ------------------------------------------------- many clients on one device (issue 29)


def test_chunked_round_temp_memory_does_not_grow_with_the_cohort():
  """With a fixed --client_chunk_size, a round's scratch memory is that of one chunk.

  FedAvg sums the chunks' weighted updates as they train (`ClientMap.map_and_sum`):
  stacked, they grew with the cohort (docs/benchmarks.md has the full-size table).
  """
  spec = importlib.util.spec_from_file_location(
    'benchmark', os.path.join(REPO, 'experiments', 'benchmark.py')
  )
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  temp = {
    clients: benchmark.jax_round_memory(
      benchmark.Config(clients, 1, 4, (16, 16, 1), chunk=10), 'auto', 'cpu'
    )['temp_bytes']
    for clients in (100, 1000)
  }
  assert temp[1000] <= 1.1 * temp[100], temp
