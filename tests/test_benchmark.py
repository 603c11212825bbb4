"""Smoke test of experiments/benchmark.py at toy size (the 'tiny' preset)."""

import importlib.util
import json
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'benchmark.py'
_HAS_TORCH = importlib.util.find_spec('torch') is not None


def _load_benchmark():
  spec = importlib.util.spec_from_file_location('benchmark', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_record(record):
  for key in ('samples_per_s', 'round_s', 'compile_s', 'peak_mem_mb'):
    assert record[key] > 0, key


@pytest.mark.skipif(
  not _HAS_TORCH, reason='torch is not installed (pip install -r requirements-bench.txt)'
)
def test_torch_backends_tiny(tmp_path):
  out = tmp_path / 'bench.json'
  _load_benchmark().main(
    [
      '--preset=tiny',
      '--backends=jax_vmap,torch_loop,torch_func',
      '--rounds=1',
      '--device=cpu',
      f'--json={out}',
    ]
  )
  backends = json.loads(out.read_text())['backends']
  for name in ('torch_loop', 'torch_func'):
    _check_record(backends[name])
    assert backends[name]['time_vs_jax_vmap'] > 0


@pytest.mark.skipif(
  not _HAS_TORCH, reason='torch is not installed (pip install -r requirements-bench.txt)'
)
def test_torch_model_matches_jax_parameter_count():
  """The PyTorch model is FedAvgCNN: the same number of parameters as apfl_jax's."""
  import jax

  from apfl_jax.algorithms.base import init_model_params
  from apfl_jax.models import create_model

  benchmark = _load_benchmark()
  for config in (benchmark.PRESETS['small'][0], benchmark.PRESETS['pfl_cifar10'][0]):
    model = benchmark.torch_setup(config, 'cpu')[1]
    params = init_model_params(
      create_model('cnn', benchmark.NUM_CLASSES), jax.random.key(0), config.image_shape
    )
    assert sum(p.numel() for p in model.parameters()) == sum(
      x.size for x in jax.tree.leaves(params)
    )


def test_jax_backend_tiny_chunked_records_times_and_flops(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  _load_benchmark().main(
    [
      '--preset=tiny',
      '--backends=jax_vmap',
      '--rounds=2',
      '--device=cpu',
      '--client_chunk_size=2',
      f'--json={out}',
    ]
  )
  report = json.loads(out.read_text())
  assert report['device']['jax'].startswith('cpu')
  record = report['backends']['jax_vmap']
  _check_record(record)
  assert record['time_vs_jax_vmap'] == 1.0
  assert '| jax_vmap |' in capsys.readouterr().out
  assert record['model_flops_per_s'] > 0
  assert record['peak_flops_per_s'] is None  # no published peak for a CPU
  sweep = _load_benchmark().PRESETS['sweep']
  assert sweep[-1].clients == 10000 and sweep[-1].chunk
