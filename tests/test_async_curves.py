"""End-to-end test of experiments/plot_async.py on hand-written run folders (no training)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(workdir, server, times, accuracies, staleness=()):
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'server': server}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, (t, a) in enumerate(zip(times, accuracies), 1):
      f.write(json.dumps({'round': i, 'virtual_time': t, 'acc': a, 'staleness': list(staleness)}))
      f.write('\n')


def plot_async(*args):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, 'experiments', 'plot_async.py'), *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': REPO},
  )


def test_a_folder_of_seed_runs_is_one_row(tmp_path):
  write_run(str(tmp_path / 'sync' / 'seed0'), 'sync', [10.0, 20.0], [0.3, 0.7])
  write_run(str(tmp_path / 'sync' / 'seed1'), 'sync', [6.0, 9.0], [0.65, 0.1])
  write_run(str(tmp_path / 'fedbuff' / 'seed0'), 'fedbuff', [4.0, 8.0], [0.6, 0.8], [0, 1])
  write_run(str(tmp_path / 'fedbuff' / 'seed1'), 'fedbuff', [5.0, 12.0], [0.2, 0.4], [2])
  out = tmp_path / 'out'
  proc = plot_async(
    f'--runs={tmp_path / "sync"},{tmp_path / "fedbuff"}',
    f'--out={out}',
    '--target=0.6',
    '--metric=acc',
    '--final_metrics=acc',
  )
  assert proc.returncode == 0, proc.stderr
  summary = (out / 'summary.md').read_text()
  lines, finals = summary.split('At the end of')
  lines = lines.strip().splitlines()
  # Last values: sync 0.7 and 0.1, fedbuff 0.8 and 0.4.
  assert finals.strip().splitlines()[-3:] == [
    '|---|---|',
    '| sync (sync) | 0.4000 ± 0.3000 |',
    '| fedbuff (fedbuff) | 0.6000 ± 0.2000 |',
  ]
  assert lines[0].startswith('| run | seeds | final virtual time | acc at the budget |')
  # Budgets 8 (seed 0) and 9 (seed 1): sync has no seed-0 evaluation by 8.
  assert lines[2] == '| sync (sync) | 2 | 14 ± 6 | 0.1000 ± 0.0000 | 13 ± 7 | 2/2 |'
  assert lines[3] == '| fedbuff (fedbuff) | 2 | 10 ± 2 | 0.5000 ± 0.3000 | 4 ± 0 | 1/2 |'
  assert lines[-1].startswith(
    'Budget: the shortest final virtual time among the runs of the same seed; per seed: 8, 9.'
  )
  assert (out / 'accuracy_vs_virtual_time.png').stat().st_size > 0
  assert (out / 'staleness_histogram.png').stat().st_size > 0


def test_bad_runs_give_one_line_errors(tmp_path):
  os.makedirs(tmp_path / 'empty')
  proc = plot_async(f'--runs={tmp_path / "empty"}', f'--out={tmp_path / "out"}')
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
    f'error: --runs: {tmp_path / "empty"} holds no metrics.jsonl, nor do its subfolders'
  ]
  write_run(str(tmp_path / 'run'), 'sync', [1.0], [0.5])
  proc = plot_async(f'--runs={tmp_path / "run"}', f'--out={tmp_path / "out"}', '--metric=nope')
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --metric:')
  proc = plot_async(
    f'--runs={tmp_path / "run"}',
    f'--out={tmp_path / "out"}',
    '--metric=acc',
    '--final_metrics=acc,nope',
  )
  assert proc.stderr.strip().splitlines() == ['error: --final_metrics: no run logged nope']
  with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
    f.write('{torn\n{"round": 9}\n')
  proc = plot_async(f'--runs={tmp_path / "run"}', f'--out={tmp_path / "out"}', '--metric=acc')
  assert proc.stderr.strip().splitlines() == [
    f'error: --workdir: line 2 of {tmp_path / "run" / "metrics.jsonl"} is not JSON; fix or '
    'delete that line'
  ]
