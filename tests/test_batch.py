"""Tests of apfl_jax.runner.batch: experiments as one more vmapped axis.

A batch of experiments must equal the separate runs of the same configs, metrics.jsonl
field for field (except elapsed_s). The values agree within float32 rounding (`RTOL`):
the batched program computes the same operations on an extra axis, which XLA may
schedule and fuse differently.
"""

import os

import numpy as np
import pytest
from test_train import APFL_TINY, read_rows
from test_train import tiny_config as train_tiny_config

from apfl_jax.core.errors import ConfigError, RunInterrupted, TrainingDivergedError
from apfl_jax.runner import batch, callbacks, train

RTOL = 1e-5


def tiny_config(**changes):
  """test_train's tiny run: 3 rounds of 3 of 4 clients, evaluated every round, in up to 4
  size groups (the common schedule's group bounds hold for every partition)."""
  return train_tiny_config(
    num_rounds=3, join_ratio=0.75, eval_every=1, max_client_buckets=4
  ).replace(**changes)


def assert_rows_close(batched, separate):
  assert [r['round'] for r in batched] == [r['round'] for r in separate]
  for b, s in zip(batched, separate):
    assert b.keys() == s.keys()
    for key in s:
      if isinstance(s[key], float):
        assert b[key] == pytest.approx(s[key], rel=RTOL, abs=1e-6), key
      elif isinstance(s[key], list):
        np.testing.assert_allclose(
          np.asarray(b[key], np.float64), np.asarray(s[key], np.float64), rtol=RTOL, atol=1e-6
        )
      else:
        assert b[key] == s[key], key


def run_both(tmp_path, configs, side_by_side=None):
  batched = [str(tmp_path / 'batch' / str(k)) for k in range(len(configs))]
  summaries = batch.train_and_evaluate_batch(configs, batched, side_by_side=side_by_side)
  assert all(isinstance(s, dict) for s in summaries)
  for k, config in enumerate(configs):
    separate = str(tmp_path / 'separate' / str(k))
    train.train_and_evaluate(config, separate)
    assert_rows_close(read_rows(batched[k]), read_rows(separate))
  return batched


@pytest.mark.slow
def test_three_uneven_seeds_side_by_side_equal_three_runs(tmp_path, synthetic_data):
  """vmap over experiments whose partitions differ in shape (padded index rows)."""
  configs = [tiny_config(algorithm='fedavg', seed=seed) for seed in (0, 1, 2)]
  run_both(tmp_path, configs, side_by_side=True)


# IID partitions of equal shapes: the separate runs share their compilations (the suite's
# persistent cache), so comparing with them stays cheap.
@pytest.mark.slow
@pytest.mark.parametrize(
  'changes',
  [{'algorithm': 'ditto'}, {'algorithm': 'fedrep'}, APFL_TINY],
  ids=['ditto', 'fedrep', 'apfl'],
)
def test_three_seeds_in_one_program_equal_three_runs(tmp_path, synthetic_data, changes):
  configs = [tiny_config(seed=seed, partition='iid', **changes) for seed in (0, 1, 2)]
  run_both(tmp_path, configs)


@pytest.mark.slow
def test_a_beta_sweep_shares_the_program_with_the_seeds(tmp_path, synthetic_data):
  configs = [
    tiny_config(seed=seed, apfl_beta=beta, partition='iid', **APFL_TINY)
    for seed in (0, 1)
    for beta in (0.1, 0.6)
  ]
  run_both(tmp_path, configs, side_by_side=True)


@pytest.mark.slow
@pytest.mark.parametrize('changes', [{'algorithm': 'ditto'}, APFL_TINY], ids=['ditto', 'apfl'])
def test_a_learning_rate_sweep_shares_the_program_with_the_seeds(tmp_path, synthetic_data, changes):
  # The server's learning rate varies with the clients' (both are on the axis).
  configs = [
    tiny_config(
      seed=seed,
      learning_rate=lr,
      server_learning_rate=server_lr,
      partition='iid',
      client_optimizer='momentum',
      **changes,
    )
    for seed in (0, 1)
    for lr, server_lr in ((0.02, 1.0), (0.08, 0.7))
  ]
  run_both(tmp_path, configs, side_by_side=True)


def test_flags_that_change_the_program_are_refused_in_one_line():
  with pytest.raises(ConfigError, match='--batch_size: experiments of one program must share'):
    batch.check_batchable([tiny_config(), tiny_config(batch_size=4)])
  with pytest.raises(ConfigError, match='--server=fedbuff: the experiment axis runs sync'):
    batch.check_batchable([tiny_config(server='fedbuff')])
  with pytest.raises(ConfigError, match='--client_optimizer: experiments of one program must'):
    batch.check_batchable([tiny_config(), tiny_config(client_optimizer='adam')])
  assert batch.check_batchable([tiny_config(seed=0), tiny_config(seed=3)]) == ('seed',)
  assert batch.check_batchable([tiny_config(), tiny_config(learning_rate=0.1, seed=1)]) == (
    'learning_rate',
    'seed',
  )


def test_a_learning_rate_is_lifted_and_shared_optimizers_stay_shared():
  """The learning rate is an `Optimizer` field, so it stacks like a number; Ditto's
  personal optimizer is its client optimizer, and one experiment's copy keeps it so."""
  from apfl_jax.algorithms.ditto import Ditto
  from apfl_jax.core import local_training

  algorithms = [
    Ditto(None, (28, 28, 1), None, local_training.make_optimizer('momentum', lr), None, 0.1, 4)
    for lr in (0.05, 0.2)
  ]
  lifted = batch.split_algorithms(algorithms, ['learning_rate'])
  assert sorted(lifted) == ['client_optimizer.learning_rate', 'personal_optimizer.learning_rate']
  np.testing.assert_allclose(lifted['client_optimizer.learning_rate'], [0.05, 0.2])
  one = batch.with_lifted(algorithms[0], {k: v[1] for k, v in lifted.items()})
  assert one.client_optimizer is one.personal_optimizer
  assert one.client_optimizer.name == 'momentum'
  assert float(one.client_optimizer.learning_rate) == pytest.approx(0.2)
  assert algorithms[0].client_optimizer.learning_rate == 0.05  # the template is untouched


@pytest.mark.slow
def test_resumed_batch_equals_uninterrupted_and_rounds_compile_once(
  tmp_path, synthetic_data, monkeypatch
):
  configs = [tiny_config(algorithm='fedprox', seed=seed, num_rounds=4) for seed in (0, 1)]
  straight = [str(tmp_path / 'straight' / str(k)) for k in range(2)]
  batch.train_and_evaluate_batch(configs, straight)

  original = batch.cohort_for_round

  def swallowed_interrupt_in_round_3(seed, round_index, *args, **kwargs):
    # main.py's signal handler requests a stop; its KeyboardInterrupt is lost here (as in
    # a __del__), so round 3 finishes and the loop stops before round 4.
    if round_index == 3:
      callbacks.request_stop()
    return original(seed, round_index, *args, **kwargs)

  monkeypatch.setattr(batch, 'cohort_for_round', swallowed_interrupt_in_round_3)
  resumed = [str(tmp_path / 'resumed' / str(k)) for k in range(2)]
  with pytest.raises(RunInterrupted, match='interrupted in round 4/4'):
    batch.train_and_evaluate_batch(configs, resumed)
  monkeypatch.setattr(batch, 'cohort_for_round', original)
  compiled = []
  monkeypatch.setattr(
    batch.ExperimentBatch, 'run_round', record_compiles(batch.ExperimentBatch.run_round, compiled)
  )
  batch.train_and_evaluate_batch(configs, resumed)
  assert compiled == [1, 1]  # rounds 3 and 4 (resumed after round 2), one compilation
  for k in range(2):
    assert read_rows(resumed[k]) == read_rows(straight[k])


def record_compiles(run_round, compiled):
  def wrapped(self, *args):
    out = run_round(self, *args)
    compiled.append(self._run_round._cache_size())
    return out

  return wrapped


@pytest.mark.slow
def test_with_client_chunks_the_experiments_take_turns_and_equal_separate_runs(
  tmp_path, synthetic_data
):
  configs = [tiny_config(seed=seed, client_chunk_size=2, num_rounds=2) for seed in (0, 1)]
  run_both(tmp_path, configs)


@pytest.mark.slow
def test_a_diverging_experiment_is_reported_and_the_others_go_on(tmp_path, synthetic_data):
  configs = [tiny_config(algorithm='fedprox', fedprox_mu=mu, num_rounds=2) for mu in (0.01, 1e38)]
  workdirs = [str(tmp_path / 'ok'), str(tmp_path / 'diverged')]
  summaries = batch.train_and_evaluate_batch(configs, workdirs)
  assert isinstance(summaries[0], dict) and summaries[0]['final_personalized_acc'] > 0
  assert isinstance(summaries[1], TrainingDivergedError)
  assert 'NaN/Inf' in str(summaries[1])
  assert [r['round'] for r in read_rows(workdirs[0])] == [1, 2]
  assert not os.path.exists(os.path.join(workdirs[1], 'summary.json'))
