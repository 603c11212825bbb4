"""Times one vmapped SGD step of a model for each convolution backend.

A measurement, not a test: for every conv_impl it jits one step
(value_and_grad of the cross-entropy, then an optax SGD update) of the model
(by default 'cnn' on 28x28x1 inputs) vmapped over the clients, excludes the
warm-up call, and prints the median wall time and the samples per second over
all clients.

Usage: python experiments/bench_conv.py [--model cnn] [--input_shape 28,28,1]
  [--clients 20] [--batch 32] [--reps 7] [--impls lax,im2col,patches]
"""

import argparse
from collections.abc import Callable
import statistics
import time

import jax
import optax

# Run as a script from anywhere: make the repository root importable.
from apfl_jax.models import MODELS, create_model


def make_step(name: str, conv_impl: str, num_classes: int) -> tuple[Callable, Callable]:
  """Returns (init, step) for the named model, both vmapped over clients."""
  model = create_model(name, num_classes, conv_impl=conv_impl)
  optimizer = optax.sgd(0.01)

  def init(key: jax.Array, x: jax.Array) -> tuple:
    params = model.init(key, x)['params']
    return params, optimizer.init(params)

  def loss(params, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x: jax.Array, y: jax.Array) -> tuple:
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(jax.vmap(init)), jax.jit(jax.vmap(step))


def time_impl(
  name: str, conv_impl: str, input_shape: tuple[int, ...], clients: int, batch: int, reps: int
) -> float:
  """Median seconds of one step over `reps` timed calls after a warm-up."""
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (clients, batch, *input_shape))
  y = jax.random.randint(ky, (clients, batch), 0, 10)
  init, step = make_step(name, conv_impl, 10)
  params, opt_state = init(jax.random.split(kp, clients), x)
  jax.block_until_ready(step(params, opt_state, x, y))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(step(params, opt_state, x, y))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  """Parses flags and prints one line per backend."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='cnn', choices=MODELS)
  parser.add_argument('--input_shape', default='28,28,1', help='height,width,channels of one image')
  parser.add_argument('--clients', type=int, default=20)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument(
    '--impls', default='lax,im2col,patches', help='comma-separated conv_impl values'
  )
  args = parser.parse_args()
  input_shape = tuple(int(n) for n in args.input_shape.split(','))
  print(
    f'backend={jax.default_backend()} model={args.model} '
    f'clients={args.clients} batch={args.batch} '
    f'input={"x".join(map(str, input_shape))} reps={args.reps}'
  )
  for conv_impl in args.impls.split(','):
    seconds = time_impl(args.model, conv_impl, input_shape, args.clients, args.batch, args.reps)
    samples = args.clients * args.batch / seconds
    print(f'{conv_impl:8s} {seconds * 1e3:8.1f} ms/step {samples:8.0f} samples/s', flush=True)


if __name__ == '__main__':
  main()
