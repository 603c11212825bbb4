"""Tests of apfl_jax.studies.plots on hand-made runs (no training)."""

import os

from conftest import make_run
import numpy as np

from apfl_jax.studies import plots, results


def test_plots_write_pngs(tmp_path, runs):
  assert plots.plot_accuracy_vs_round(runs, str(tmp_path / 'acc.png'))
  assert plots.plot_per_client_accuracy(runs, str(tmp_path / 'clients.png'))
  pixels = np.random.default_rng(0).uniform(size=(3, 4, 8, 8, 1))
  plots.plot_generated_samples(pixels, ['a', 'b', 'c'], [2], 'title', str(tmp_path / 'samples.png'))
  for name in ('acc.png', 'clients.png', 'samples.png'):
    assert os.path.getsize(tmp_path / name) > 0


def test_plots_without_data_write_nothing(tmp_path):
  failed = [make_run('fedavg', 0, 0, error='boom')]
  assert not plots.plot_accuracy_vs_round(failed, str(tmp_path / 'acc.png'))
  no_clients = results.Run(
    'fedavg', '', 0, '/w', {'final_personalized_acc': 0.5}, [{'round': 1, 'personalized_acc': 0.5}]
  )
  assert not plots.plot_per_client_accuracy([no_clients], str(tmp_path / 'clients.png'))
  assert os.listdir(tmp_path) == []


def test_async_plots_write_pngs(tmp_path):
  groups = {
    'sync': [results.Curve([1, 2], [0.1, 0.2])],
    'fedbuff': [results.Curve([1, 2], [0.1, 0.3]), results.Curve([0.5, 1.5], [0.2, None])],
  }
  plots.plot_accuracy_vs_virtual_time(groups, str(tmp_path / 'v.png'))
  plots.plot_staleness_histogram([0, 1, 1, 3], str(tmp_path / 's.png'))
  assert (tmp_path / 'v.png').stat().st_size > 0 and (tmp_path / 's.png').stat().st_size > 0
