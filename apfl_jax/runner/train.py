"""`train_and_evaluate(config, workdir)`: one complete, resumable federated experiment.

Data flow of a run:
  load the data set (tfds array_record) -> partition it among clients (seeded) ->
  stack every client's index row on the device -> init the algorithm state ->
  per round: pick the cohort (seeded by (seed, round)) -> ONE jitted call trains the
  cohort (through the client map: vmapped, chunked, split over a device mesh) and
  updates the server -> NaN check -> every --eval_every rounds a
  vmapped evaluation of every client -> metrics.jsonl -> every --checkpoint_every
  rounds an orbax checkpoint.

Every random draw of round r is derived from (seed, r), so a run resumed from a
checkpoint computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from apfl_jax.config.config import Config
from apfl_jax.core import sharding
from apfl_jax.core.errors import ConfigError, RunInterrupted
from apfl_jax.runner import callbacks, checkpoints, run_folder
from apfl_jax.runner import workdir as workdir_lib
from apfl_jax.runner.drivers import AsyncRounds, Driver, SyncRounds
from apfl_jax.runner.evaluators import Evaluator
from apfl_jax.runner.experiment import Experiment, build_experiment


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment described by `config` in `workdir`.

  The workdir is locked for the run (a second live run in it is refused); config.json is
  written only once the data loaded and the sizes passed `preflight`; a run that fails or
  is interrupted before its first checkpoint removes what it created.

  Args:
    config: a validated config.
    workdir: output folder; a folder holding a checkpoint of the same config resumes.

  Returns:
    The summary (final and best-over-rounds metrics), also written to summary.json.

  Raises:
    UserError: one line naming the flag, file, or round and client.
    RunInterrupted: Ctrl-C or SIGTERM; says the round reached and how to resume.
  """
  config.validate()
  if jax.process_count() > 1 and not workdir:
    raise ConfigError(
      '--workdir: a multi-process run needs one --workdir that every process can reach '
      '(docs/multihost.md)'
    )
  workdir = os.path.abspath(os.path.expanduser(workdir or workdir_lib.default_workdir(config)))
  if not sharding.is_main_process():
    # Process 0 alone locks, cleans and writes the workdir; the others use it once it has.
    sharding.barrier('apfl_jax: workdir opened')
    return _run(config, workdir_lib.open_workdir(workdir, config))
  created = workdir_lib.first_missing_folder(workdir)
  workdir = workdir_lib.open_workdir(workdir, config)
  entries_before = set() if created else set(os.listdir(workdir))
  lock = workdir_lib.lock_workdir(workdir)
  try:
    if workdir_lib.remove_abandoned_start(workdir):  # a start killed before its checkpoint
      entries_before = set(os.listdir(workdir)) - {workdir_lib.LOCK_NAME}
    sharding.barrier('apfl_jax: workdir opened')
    return _run(config, workdir)
  except BaseException:
    if 'config.json' not in entries_before and not workdir_lib.has_checkpoint(workdir):
      workdir_lib.remove_failed_start(workdir, created, entries_before)
    raise
  finally:
    lock.close()


def _run(config: Config, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` in a locked workdir."""
  verbose = config.verbose and sharding.is_main_process()  # one progress line a round
  log = callbacks.Console() if verbose else (lambda *a, **k: None)
  log(
    f'loading {config.dataset} and partitioning it among {config.num_clients} clients', flush=True
  )
  try:
    exp = build_experiment(config)
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if not _out_of_memory(e):
      raise
    raise ConfigError(
      f'--dataset={config.dataset}: out of memory while placing the data set on the device '
      f'({type(e).__name__}); free memory or use a machine with more'
    ) from None
  workdir_lib.commit_workdir(workdir, config)
  workdir_lib.write_file(os.path.join(workdir, 'partition.txt'), exp.partition.table() + '\n')
  workdir_lib.write_file(os.path.join(workdir, 'partition.json'), exp.partition.to_json())
  log(
    f'{config.dataset}: {exp.partition.num_clients} clients, partition '
    f'{config.partition}\n{exp.partition.table()}'
  )

  base_key = jax.random.key(config.seed)
  state = sharding.replicate(
    exp.algorithm.init(jax.random.fold_in(base_key, 0)), exp.algorithm.client_map.mesh
  )
  rounds: Driver = SyncRounds(exp) if config.server == 'sync' else AsyncRounds(exp)
  tree = rounds.init(state)
  with checkpoints.write_errors(workdir):
    manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'), options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
  try:
    summary = _round_loop(config, workdir, exp, rounds, tree, manager, base_key, log)
  except BaseException:
    checkpoints.finish(manager, workdir, failed=True)  # an async save in flight is kept
    raise
  checkpoints.finish(manager, workdir)
  return summary


def _round_loop(
  config: Config,
  workdir: str,
  exp: Experiment,
  rounds: Driver,
  tree: Any,
  manager: ocp.CheckpointManager,
  base_key: jax.Array,
  log: Any,
) -> dict[str, Any]:
  """Resumes from the newest good checkpoint and runs the remaining rounds."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  tree, done = checkpoints.restore_newest_good(manager, rounds, tree, workdir)
  if done:
    log(f'resuming {workdir} after round {done}')
  rows = run_folder.read_metrics(workdir, done)
  workdir_lib.write_metrics(metrics_path, rows)
  elapsed_offset = rows[-1]['elapsed_s'] if rows else 0.0

  evaluate = Evaluator(exp)
  hooks = callbacks.default_callbacks(workdir, rows, manager, rounds, config, log)
  if done < config.num_rounds:
    log(
      f'round {done + 1}/{config.num_rounds}: compiling the round and the evaluation '
      '(the first round takes longer)',
      flush=True,
    )
  t0 = time.perf_counter()
  r = done + 1  # the round running (named when it is interrupted)
  try:
    for r in range(done + 1, config.num_rounds + 1):
      callbacks.stop_if_requested()
      tree, report = rounds.step(tree, r, jax.random.fold_in(base_key, r))
      for hook in hooks:
        hook.after_step(r, report)
      row = None
      if r % config.eval_every == 0 or r == config.num_rounds:
        row = {
          'round': r,
          **evaluate(rounds.algorithm_state(tree)),
          'train_loss': float(np.mean(report.loss)),
          **report.extra,
          'elapsed_s': round(elapsed_offset + time.perf_counter() - t0, 3),
        }
      for hook in hooks:
        hook.after_round(r, tree, row, report)
  except KeyboardInterrupt:
    callbacks.stop_handled()
    with checkpoints.write_errors(workdir):
      manager.wait_until_finished()
    saved = manager.latest_step() or 0
    kept = (
      (
        f'rounds 1-{saved} are checkpointed; rerun the same command with '
        f'--workdir={workdir} to resume'
      )
      if saved
      else 'nothing was checkpointed yet; rerun the same command to start over'
    )
    raise RunInterrupted(f'interrupted in round {r}/{config.num_rounds}: {kept}') from None
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    if not _out_of_memory(e):
      raise
    raise ConfigError(
      f'--batch_size: round {r} ran out of device memory; lower --batch_size or --join_ratio'
    ) from None
  finally:
    for hook in hooks:
      hook.close()

  summary = run_folder.summarize(rows)
  workdir_lib.write_file(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=2))
  log(run_folder.format_summary(summary, workdir))
  return summary


def _out_of_memory(error: BaseException) -> bool:
  """Whether `error` says the host (MemoryError) or the device (RESOURCE_EXHAUSTED) is full."""
  return isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in str(error)
