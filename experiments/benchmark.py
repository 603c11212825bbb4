"""Times one federated round of FedAvg in JAX (vmapped) and in PyTorch (two ways).

The same work in every backend: K clients each start from the global model, take
`steps` plain-SGD steps on batches of `batch` examples of their own (synthetic) data,
and the server averages the trained models weighted by example counts. Every client
holds exactly steps * batch examples, so one local epoch is exactly `steps` full
batches. The model is PFLlib's FedAvgCNN (conv5x5 32 - ReLU - maxpool 2 - conv5x5 64 -
ReLU - maxpool 2 - fc 512 - ReLU - fc classes) in every backend and preset; the
pfl_cifar10 preset uses it on 32x32x3 inputs as a stand-in for pfl-research's small
CIFAR-10 CNN (an approximation, not its exact layers).

Backends:
  jax_vmap: apfl_jax's own round, `jax.jit(FedAvg.run_round)`: all clients train in
    one vmapped call (`local_training.train_client` in a `lax.scan`), then the server
    update.
  torch_loop: clients train one after another, updating ONE model in place
    (load_state_dict from the global model, SGD steps, accumulate the weighted
    average), as PFLlib and pfl-research do.
  torch_func: torch.func: `vmap(grad(functional_call(...)))` over stacked client
    parameters, one SGD step for all clients at a time.

Every (configuration, backend) runs in its own subprocess, so that its peak memory is
its own: on CPU `peak_mem_mb` is the subprocess's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the framework runtime;
`base_mem_mb` is the same right after importing the framework); on GPU it is
`peak_bytes_in_use` of the JAX device or `torch.cuda.max_memory_allocated()`.
`compile_s` is the wall time of the first round (JAX: tracing, compilation and one
round; PyTorch: a warm-up round); `round_s` is the median of `--rounds` later rounds,
with the device synchronised before every clock read. `load_avg_1m` is the machine's
1-minute load average when the backend finished (a noise indicator on shared hosts).

Presets:
  small: 20 clients x 5 steps x batch 32, 28x28x1, 10 classes.
  pfl_cifar10: 50 clients x 5 steps x batch 10, 32x32x3, 10 classes.
  sweep: the small configuration with 10, 100, 1000 and 10,000 clients, the last in
    chunks of 1000 clients (`--client_chunk_size`; `--max_clients` drops the larger
    ones, e.g. on CPU). jax_vmap records XLA's memory analysis of its compiled round
    (`temp_bytes`, `argument_bytes`, `output_bytes`); `--memory_only` reports only that,
    compiled from shapes without running anything (docs/benchmarks.md: with a fixed
    --client_chunk_size, temp bytes do not grow with the cohort).
  tiny: 3 clients x 2 steps x batch 4 on 16x16x1 (for tests).

Usage:
  python experiments/benchmark.py --preset=small [--backends=jax_vmap,torch_loop]
    [--rounds=5] [--json=PATH] [--conv_impl=auto] [--device=auto|cpu|gpu]
    [--max_clients=N] [--client_chunk_size=N] [--compute_dtype=float32|bfloat16]
  python experiments/benchmark.py --preset=sweep --memory_only --client_chunk_size=100

The markdown table goes to stdout. The JSON file holds `device`, `versions`, `runs`
(every configuration with its `backends`) and, at the top level, `backends` of the
preset's last (largest) configuration; each backend has `samples_per_s`, `round_s`,
`compile_s`, `peak_mem_mb`, `base_mem_mb` and `time_vs_jax_vmap` (its round_s over
jax_vmap's). jax_vmap also records `model_flops_per_s` (XLA's FLOP count of one
client's training step, forward and backward, times clients x steps, over round_s) and
`peak_flops_per_s`: the device's published dense peak per precision (float32, tf32,
bfloat16; null for a device not in `PEAK_FLOPS`, e.g. any CPU).
"""

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# Run as a script from anywhere: make the repository root importable.

BACKENDS = ('jax_vmap', 'torch_loop', 'torch_func')
# apfl_jax.models.conv.CONV_IMPLS, here so that the parent process does not import jax.
CONV_IMPLS = ('auto', 'lax', 'im2col', 'patches')
# Published dense peak FLOP/s by `device_kind` (vendor data sheets; SXM parts).
PEAK_FLOPS = {
  'NVIDIA H100 80GB HBM3': {'float32': 66.9e12, 'tf32': 494.7e12, 'bfloat16': 989.4e12},
  'NVIDIA H200': {'float32': 66.9e12, 'tf32': 494.7e12, 'bfloat16': 989.4e12},
  'NVIDIA A100-SXM4-80GB': {'float32': 19.5e12, 'tf32': 156e12, 'bfloat16': 312e12},
  'NVIDIA A100-SXM4-40GB': {'float32': 19.5e12, 'tf32': 156e12, 'bfloat16': 312e12},
  'TPU v4': {'bfloat16': 275e12},
  'TPU v5 lite': {'bfloat16': 197e12},
  'TPU v5': {'bfloat16': 459e12},
  'TPU v6 lite': {'bfloat16': 918e12},
}
LEARNING_RATE = 0.01
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
  """One round's shape.

  Attributes:
    clients: clients per round.
    steps: local SGD steps per client.
    batch: examples per step.
    image_shape: (height, width, channels).
    chunk: clients per call of the client map (0: all at once).
  """

  clients: int
  steps: int
  batch: int
  image_shape: tuple[int, int, int]
  chunk: int = 0

  @property
  def samples_per_round(self) -> int:
    return self.clients * self.steps * self.batch

  def describe(self) -> str:
    shape = 'x'.join(map(str, self.image_shape))
    chunks = f', chunks of {self.chunk}' if self.chunk else ''
    return f'{self.clients} clients x {self.steps} steps x batch {self.batch}, {shape}{chunks}'


PRESETS = {
  'small': (Config(20, 5, 32, (28, 28, 1)),),
  'pfl_cifar10': (Config(50, 5, 10, (32, 32, 3)),),
  'sweep': tuple(Config(k, 5, 32, (28, 28, 1)) for k in (10, 100, 1000))
  + (Config(10000, 5, 32, (28, 28, 1), chunk=1000),),
  'tiny': (Config(3, 2, 4, (16, 16, 1)),),
}


def synthetic_data(config: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC images and int32 labels, client c owning rows [c*n, (c+1)*n)."""
  rng = np.random.default_rng(seed)
  total = config.clients * config.steps * config.batch
  images = rng.integers(0, 256, size=(total, *config.image_shape), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=(total,)).astype(np.int32)
  return images, labels


def _cpu_rss_mb() -> float:
  """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_rounds(run_round, rounds: int, sync) -> tuple[float, list[float]]:
  """(first call seconds, later calls' seconds); run_round(r) runs round r."""
  times = []
  for r in range(rounds + 1):
    start = time.perf_counter()
    run_round(r)
    sync()
    times.append(time.perf_counter() - start)
  return times[0], times[1:]


def run_jax_vmap(
  config: Config, rounds: int, conv_impl: str, device: str, compute_dtype: str = 'float32'
) -> dict:
  """Times apfl_jax's jitted FedAvg round."""
  if device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  import jax.numpy as jnp
  import optax

  from apfl_jax.algorithms.base import classification_loss, init_model_params
  from apfl_jax.algorithms.fedavg import FedAvg
  from apfl_jax.core import local_training
  from apfl_jax.core.cohort import ClientMap
  from apfl_jax.data import client_data
  from apfl_jax.data.partition import Partition
  from apfl_jax.models import create_model
  from apfl_jax.models.conv import resolve_conv_impl

  base_mem = _cpu_rss_mb()
  if device == 'gpu' and jax.default_backend() != 'gpu':
    raise SystemExit('error: --device=gpu but JAX has no GPU backend')
  images, labels = synthetic_data(config)
  n = config.steps * config.batch
  train_indices = tuple(np.arange(c * n, (c + 1) * n) for c in range(config.clients))
  empty = tuple(np.zeros((0,), np.int64) for _ in range(config.clients))
  counts = np.stack([np.bincount(labels[i], minlength=NUM_CLASSES) for i in train_indices])
  partition = Partition(
    train_indices=train_indices,
    test_indices=empty,
    num_classes=NUM_CLASSES,
    train_counts=counts,
    test_counts=np.zeros_like(counts),
  )
  dataset = argparse.Namespace(
    train_images=images,
    train_labels=labels,
    test_images=images[:1],
    test_labels=labels[:1],
    mean=np.full((config.image_shape[-1],), 0.5, np.float32),
    std=np.full((config.image_shape[-1],), 0.25, np.float32),
  )
  data = client_data.build_federated_data(dataset, partition)
  schedule = local_training.Schedule.create(
    batch_size=config.batch, local_epochs=0, local_steps=config.steps, min_count=n, max_count=n
  )
  model = create_model('cnn', NUM_CLASSES, conv_impl, compute_dtype)
  algorithm = FedAvg(
    model, config.image_shape, schedule, optax.sgd(LEARNING_RATE), optax.sgd(1.0)
  ).with_client_map(ClientMap(chunk_size=config.chunk))
  key = jax.random.key(0)
  state = {'value': algorithm.init(key)}
  cohort = jnp.arange(config.clients, dtype=jnp.int32)
  run = jax.jit(algorithm.run_round)

  def run_round(r):
    state['value'], _ = run(state['value'], cohort, jax.random.fold_in(key, r), data)

  compile_s, times = _time_rounds(run_round, rounds, lambda: jax.block_until_ready(state['value']))
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    peak = _cpu_rss_mb()
  else:
    peak = dev.memory_stats()['peak_bytes_in_use'] / 2**20
  loss_fn = classification_loss(model)
  batch = (
    init_model_params(model, key, config.image_shape),
    jnp.zeros((config.batch, *config.image_shape)),
    jnp.zeros((config.batch,), jnp.int32),
    jnp.ones((config.batch,)),
    key,
  )
  step_flops = jax.jit(jax.grad(loss_fn)).lower(*batch).compile().cost_analysis()['flops']
  memory = compiled_memory(run.lower(state['value'], cohort, key, data).compile())
  return {
    **memory,
    'device': f'{dev.platform} ({dev.device_kind})',
    'conv_impl': resolve_conv_impl(conv_impl),
    'compute_dtype': compute_dtype,
    'compile_s': compile_s,
    'times': times,
    'peak_mem_mb': peak,
    'base_mem_mb': base_mem,
    'model_flops_per_round': step_flops * config.clients * config.steps,
    'peak_flops_per_s': PEAK_FLOPS.get(dev.device_kind),
  }


def compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled round, in bytes (per device).

  `temp_bytes` is the scratch the round needs beyond its inputs and outputs: with
  --client_chunk_size it should not grow with the cohort.
  """
  analysis = compiled.memory_analysis()
  return {
    'temp_bytes': int(analysis.temp_size_in_bytes),
    'argument_bytes': int(analysis.argument_size_in_bytes),
    'output_bytes': int(analysis.output_size_in_bytes),
  }


def jax_round_memory(
  config: Config, conv_impl: str, device: str, compute_dtype: str = 'float32'
) -> dict:
  """`compiled_memory` of apfl_jax's FedAvg round, compiled from shapes only.

  Nothing is allocated or run (no data set, no state), so a 10,000-client round is
  measured in seconds on any machine.
  """
  if device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  import jax.numpy as jnp
  import optax

  from apfl_jax.algorithms.fedavg import FedAvg
  from apfl_jax.core import local_training
  from apfl_jax.core.cohort import ClientMap
  from apfl_jax.data.client_data import FederatedData
  from apfl_jax.models import create_model

  k, n = config.clients, config.steps * config.batch
  shape = jax.ShapeDtypeStruct
  data = FederatedData(
    train_images=shape((k * n, *config.image_shape), jnp.uint8),
    train_labels=shape((k * n,), jnp.int32),
    test_images=shape((1, *config.image_shape), jnp.uint8),
    test_labels=shape((1,), jnp.int32),
    train_index=shape((k, n), jnp.int32),
    train_count=shape((k,), jnp.int32),
    test_index=shape((k, 1), jnp.int32),
    test_count=shape((k,), jnp.int32),
    union_test_index=shape((1,), jnp.int32),
    union_test_client=shape((1,), jnp.int32),
    mean=shape(config.image_shape[-1:], jnp.float32),
    std=shape(config.image_shape[-1:], jnp.float32),
  )
  schedule = local_training.Schedule.create(
    batch_size=config.batch, local_epochs=0, local_steps=config.steps, min_count=n, max_count=n
  )
  model = create_model('cnn', NUM_CLASSES, conv_impl, compute_dtype)
  algorithm = FedAvg(
    model, config.image_shape, schedule, optax.sgd(LEARNING_RATE), optax.sgd(1.0)
  ).with_client_map(ClientMap(chunk_size=config.chunk))
  state = jax.eval_shape(algorithm.init, jax.random.key(0))
  start = time.perf_counter()
  compiled = (
    jax.jit(algorithm.run_round)
    .lower(state, shape((k,), jnp.int32), jax.random.key(1), data)
    .compile()
  )
  dev = jax.devices()[0]
  return {
    **compiled_memory(compiled),
    'compile_s': time.perf_counter() - start,
    'device': f'{dev.platform} ({dev.device_kind})',
  }


def memory_table(runs: list[dict]) -> str:
  """The --memory_only results as one markdown table."""
  first = runs[0]['memory']['temp_bytes']
  lines = [
    '| configuration | temp MiB | vs first | arguments MiB | outputs MiB | compile s |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for run in runs:
    m = run['memory']
    lines.append(
      f'| {run["config_text"]} | {m["temp_bytes"] / 2**20:,.1f} | '
      f'{m["temp_bytes"] / first:.3f} | {m["argument_bytes"] / 2**20:,.1f} | '
      f'{m["output_bytes"] / 2**20:,.1f} | {m["compile_s"]:.1f} |'
    )
  return '\n'.join(lines)


def torch_setup(config: Config, device: str):
  """(torch device, model, images, labels, client index rows, normalise)."""
  import torch
  from torch import nn

  if device == 'gpu' and not torch.cuda.is_available():
    raise SystemExit('error: --device=gpu but torch has no CUDA device')
  use_cuda = device != 'cpu' and torch.cuda.is_available()
  dev = torch.device('cuda' if use_cuda else 'cpu')
  torch.manual_seed(0)
  h, w, c = config.image_shape
  flat = 64 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
  model = nn.Sequential(
    nn.Conv2d(c, 32, 5),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 5),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(flat, 512),
    nn.ReLU(),
    nn.Linear(512, NUM_CLASSES),
  ).to(dev)
  images_np, labels_np = synthetic_data(config)
  images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(dev)
  labels = torch.from_numpy(labels_np).long().to(dev)
  n = config.steps * config.batch
  index = torch.arange(config.clients * n, device=dev).reshape(config.clients, n)
  mean = torch.full((1, c, 1, 1), 0.5, device=dev)
  std = torch.full((1, c, 1, 1), 0.25, device=dev)

  def normalize(x):
    return (x.float() / 255.0 - mean) / std

  return dev, model, images, labels, index, normalize


def _torch_result(torch, dev, compile_s, times, base_mem) -> dict:
  if dev.type == 'cuda':
    peak = torch.cuda.max_memory_allocated() / 2**20
    name = f'cuda ({torch.cuda.get_device_name()})'
  else:
    peak = _cpu_rss_mb()
    name = f'cpu ({torch.get_num_threads()} threads)'
  return {
    'device': name,
    'compile_s': compile_s,
    'times': times,
    'peak_mem_mb': peak,
    'base_mem_mb': base_mem,
  }


def run_torch_loop(config: Config, rounds: int, device: str) -> dict:
  """Times clients trained one after another on one in-place model."""
  import torch

  base_mem = _cpu_rss_mb()
  dev, model, images, labels, index, normalize = torch_setup(config, device)
  loss_fn = torch.nn.functional.cross_entropy
  n = index.shape[1]
  global_state = {'value': {k: v.clone() for k, v in model.state_dict().items()}}
  generator = torch.Generator(device=dev).manual_seed(0)
  weight = 1.0 / config.clients  # Equal example counts.

  def run_round(r):
    del r
    average = {k: torch.zeros_like(v) for k, v in global_state['value'].items()}
    for client in range(config.clients):
      model.load_state_dict(global_state['value'])
      optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
      order = index[client][torch.randperm(n, generator=generator, device=dev)]
      for step in range(config.steps):
        ids = order[step * config.batch : (step + 1) * config.batch]
        optimizer.zero_grad()
        loss_fn(model(normalize(images[ids])), labels[ids]).backward()
        optimizer.step()
      with torch.no_grad():
        for k, v in model.state_dict().items():
          average[k].add_(v, alpha=weight)
    global_state['value'] = average

  sync = torch.cuda.synchronize if dev.type == 'cuda' else lambda: None
  compile_s, times = _time_rounds(run_round, rounds, sync)
  return _torch_result(torch, dev, compile_s, times, base_mem)


def run_torch_func(config: Config, rounds: int, device: str) -> dict:
  """Times torch.func: vmap(grad) over stacked client parameters."""
  import torch
  from torch import func

  base_mem = _cpu_rss_mb()
  dev, model, images, labels, index, normalize = torch_setup(config, device)
  n = index.shape[1]

  def loss(params, x, y):
    return torch.nn.functional.cross_entropy(func.functional_call(model, params, (x,)), y)

  grads_fn = func.vmap(func.grad(loss))
  global_params = {'value': {k: v.detach().clone() for k, v in model.named_parameters()}}
  generator = torch.Generator(device=dev).manual_seed(0)
  rows = torch.arange(config.clients, device=dev)[:, None]

  def run_round(r):
    del r
    params = {
      k: v.expand(config.clients, *v.shape).clone() for k, v in global_params['value'].items()
    }
    order = torch.argsort(torch.rand(config.clients, n, generator=generator, device=dev), dim=1)
    for step in range(config.steps):
      ids = index[rows, order[:, step * config.batch : (step + 1) * config.batch]]
      x = normalize(images[ids.flatten()]).reshape(*ids.shape, *images.shape[1:])
      grads = grads_fn(params, x, labels[ids])
      params = {k: v - LEARNING_RATE * grads[k] for k, v in params.items()}
    global_params['value'] = {k: v.mean(0) for k, v in params.items()}  # Equal weights.

  sync = torch.cuda.synchronize if dev.type == 'cuda' else lambda: None
  compile_s, times = _time_rounds(run_round, rounds, sync)
  return _torch_result(torch, dev, compile_s, times, base_mem)


def run_backend(
  backend: str,
  config: Config,
  rounds: int,
  conv_impl: str,
  device: str,
  compute_dtype: str = 'float32',
) -> dict:
  """Runs one backend in this process; returns its timing record."""
  if backend == 'jax_vmap':
    raw = run_jax_vmap(config, rounds, conv_impl, device, compute_dtype)
  elif backend == 'torch_loop':
    raw = run_torch_loop(config, rounds, device)
  else:
    raw = run_torch_func(config, rounds, device)
  times = raw.pop('times')
  round_s = statistics.median(times)
  if 'model_flops_per_round' in raw:
    raw['model_flops_per_s'] = raw['model_flops_per_round'] / round_s
  return {
    **raw,
    'round_s': round_s,
    'round_s_all': times,
    'samples_per_s': config.samples_per_round / round_s,
    'load_avg_1m': os.getloadavg()[0],
  }


def run_backend_subprocess(backend: str, config: Config, args: argparse.Namespace) -> dict:
  """Runs one backend in a fresh Python process (so its peak memory is its own).

  Raises:
    SystemExit: one line naming the backend when the worker fails (its own error is
      printed above it).
  """
  spec = json.dumps(
    {
      'backend': backend,
      'config': dataclasses.asdict(config),
      'rounds': args.rounds,
      'conv_impl': args.conv_impl,
      'device': args.device,
      'compute_dtype': args.compute_dtype,
    }
  )
  try:
    out = subprocess.run(
      [sys.executable, __file__, f'--_worker={spec}'],
      check=True,
      stdout=subprocess.PIPE,
      text=True,
    ).stdout
  except subprocess.CalledProcessError as e:
    raise SystemExit(
      f'error: the {backend} worker failed (exit status {e.returncode}) on {config.describe()}'
    ) from None
  return json.loads(out.strip().splitlines()[-1])


def _worker(spec: str) -> None:
  spec = json.loads(spec)
  config = spec['config']
  config = Config(
    config['clients'],
    config['steps'],
    config['batch'],
    tuple(config['image_shape']),
    config['chunk'],
  )
  record = run_backend(
    spec['backend'],
    config,
    spec['rounds'],
    spec['conv_impl'],
    spec['device'],
    spec['compute_dtype'],
  )
  print(json.dumps(record))


def markdown_table(runs: list[dict]) -> str:
  """The runs' results as one markdown table."""
  lines = [
    '| configuration | backend | round s (median) | samples/s | first round s '
    '| peak mem MiB (after import) | time vs jax_vmap | model TFLOP/s |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for run in runs:
    for name, r in run['backends'].items():
      ratio = r.get('time_vs_jax_vmap')
      flops = r.get('model_flops_per_s')
      lines.append(
        f'| {run["config_text"]} | {name} | {r["round_s"]:.3f} | '
        f'{r["samples_per_s"]:,.0f} | {r["compile_s"]:.2f} | '
        f'{r["peak_mem_mb"]:,.0f} ({r["base_mem_mb"]:,.0f}) | '
        f'{"-" if ratio is None else f"{ratio:.2f}x"} | '
        f'{"-" if flops is None else f"{flops / 1e12:.3f}"} |'
      )
  return '\n'.join(lines)


def _versions() -> dict:
  versions = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch'):
    spec = importlib.util.find_spec(name)
    if spec is not None:
      versions[name] = __import__(name).__version__
  return versions


class _Parser(argparse.ArgumentParser):
  """argparse with its errors as one line (not the multi-line usage)."""

  def error(self, message: str):  # type: ignore[override]
    raise SystemExit(f'error: {message} (see --help)')


def has_nvidia_gpu() -> bool:
  """Whether this machine shows an NVIDIA device (without importing jax or torch)."""
  return bool(glob.glob('/dev/nvidia[0-9]*'))


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
  """Checks the flags before any worker starts; returns the backends to run.

  Raises:
    SystemExit: one line naming the flag.
  """
  if args.rounds < 1:
    parser.error(f'--rounds must be at least 1 (timed rounds after the first), got {args.rounds}')
  if args.max_clients < 0:
    parser.error(f'--max_clients must be 0 (no cap) or positive, got {args.max_clients}')
  if args.client_chunk_size < -1:
    parser.error(
      f"--client_chunk_size must be -1 (the preset's), 0 (all at once) or positive, "
      f'got {args.client_chunk_size}'
    )
  if args.device == 'gpu' and not has_nvidia_gpu():
    parser.error('--device=gpu: this machine has no NVIDIA GPU (no /dev/nvidia*)')
  backends = [b for b in args.backends.split(',') if b]
  unknown = set(backends) - set(BACKENDS)
  if unknown:
    parser.error(f'--backends: unknown backends {sorted(unknown)}; choose from {BACKENDS}')
  if not backends:
    parser.error(f'--backends is empty; choose from {BACKENDS}')
  if len(set(backends)) < len(backends):
    parser.error(f'--backends names a backend more than once: {args.backends}')
  if args.json:
    from apfl_jax.core.errors import UserError
    from apfl_jax.studies import outputs

    try:
      outputs.check_output_file(args.json, 'json')
    except UserError as e:
      parser.error(str(e))
  return backends


def main(argv: list[str] | None = None) -> dict:
  """Parses flags, runs every configuration and backend, prints the table.

  Every flag (and that --json can be written) is checked before the first worker starts.
  """
  parser = _Parser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='small', choices=sorted(PRESETS))
  parser.add_argument(
    '--backends', default=','.join(BACKENDS), help='comma-separated subset of ' + ','.join(BACKENDS)
  )
  parser.add_argument(
    '--rounds', type=int, default=5, help='timed rounds after the first (warm-up/compile) round'
  )
  parser.add_argument('--json', default='', help='also write the results here')
  parser.add_argument(
    '--conv_impl',
    default='auto',
    choices=CONV_IMPLS,
    help='apfl_jax conv backend: auto, lax, im2col or patches',
  )
  parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'gpu'))
  parser.add_argument(
    '--max_clients', type=int, default=0, help='skip configurations with more clients (0: no cap)'
  )
  parser.add_argument(
    '--client_chunk_size',
    type=int,
    default=-1,
    help='jax_vmap: clients per client-map call in every configuration '
    "(0: all at once; default: the preset's own)",
  )
  parser.add_argument(
    '--compute_dtype',
    default='float32',
    choices=('float32', 'bfloat16'),
    help='jax_vmap: activations and patches in this dtype',
  )
  parser.add_argument(
    '--memory_only',
    action='store_true',
    help="jax_vmap: only compile each configuration's round from shapes and report XLA's "
    'memory analysis (temp, argument and output bytes); nothing runs',
  )
  parser.add_argument('--_worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    _worker(args._worker)
    return {}

  backends = validate(args, parser)
  if importlib.util.find_spec('torch') is None and any(b != 'jax_vmap' for b in backends):
    print(
      'note: torch is not installed (pip install -r requirements-bench.txt); running jax_vmap only'
    )
    backends = [b for b in backends if b == 'jax_vmap']
  configs = PRESETS[args.preset]
  if args.client_chunk_size >= 0:
    configs = tuple(dataclasses.replace(c, chunk=args.client_chunk_size) for c in configs)
  if args.max_clients:
    skipped = [c for c in configs if c.clients > args.max_clients]
    configs = tuple(c for c in configs if c.clients <= args.max_clients)
    if not configs:
      parser.error(
        f'--max_clients={args.max_clients} skips every configuration of --preset={args.preset}'
      )
    for c in skipped:
      print(f'note: --max_clients={args.max_clients} skips {c.describe()}')

  if args.memory_only:
    return memory_report(configs, args)
  runs, device = [], {}
  for config in configs:
    results = {}
    for backend in backends:
      print(f'running {backend}: {config.describe()} ...', file=sys.stderr, flush=True)
      results[backend] = run_backend_subprocess(backend, config, args)
      device[backend.split('_')[0]] = results[backend]['device']
    if 'jax_vmap' in results:
      for r in results.values():
        r['time_vs_jax_vmap'] = r['round_s'] / results['jax_vmap']['round_s']
    runs.append(
      {'config': dataclasses.asdict(config), 'config_text': config.describe(), 'backends': results}
    )
  report = {
    'preset': args.preset,
    'device': device,
    'versions': _versions(),
    'cpu_count': os.cpu_count(),
    'rounds': args.rounds,
    'date': time.strftime('%Y-%m-%d'),
    'runs': runs,
    'backends': runs[-1]['backends'] if runs else {},
  }
  print(markdown_table(runs))
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')
  return report


def memory_report(configs: tuple[Config, ...], args: argparse.Namespace) -> dict:
  """--memory_only: `jax_round_memory` of every configuration, as a table and JSON."""
  runs = []
  for config in configs:
    print(f'compiling jax_vmap: {config.describe()} ...', file=sys.stderr, flush=True)
    memory = jax_round_memory(config, args.conv_impl, args.device, args.compute_dtype)
    runs.append(
      {'config': dataclasses.asdict(config), 'config_text': config.describe(), 'memory': memory}
    )
  report = {
    'preset': args.preset,
    'device': {'jax': runs[0]['memory']['device']} if runs else {},
    'versions': _versions(),
    'date': time.strftime('%Y-%m-%d'),
    'runs': runs,
  }
  print(memory_table(runs))
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + '\n')
  return report


if __name__ == '__main__':
  main()
