"""Convolution and dense layers with interchangeable convolution backends.

Every backend of `Conv` owns the same parameters ('kernel' of shape
[kh, kw, in, out] in HWIO layout, and 'bias' of shape [out]), so parameters
trained with one backend can be applied with another.

Backends:
  'lax': `lax.conv_general_dilated`, what `flax.linen.Conv` runs. Best on
    accelerators.
  'im2col': the input's kh*kw shifted, strided windows are sliced out and
    concatenated along channels, then multiplied with the reshaped kernel.
    Its gradient is made of pads, adds and matmuls, which XLA:CPU runs far
    faster than its backward convolutions (about 3x per training step of the
    FedAvg CNN vmapped over clients; see experiments/bench_conv.py).
  'patches': `lax.conv_general_dilated_patches` followed by a matmul; kept as
    a reference point for the benchmark.
  'auto': 'im2col' on every platform, because it is the fastest measured on each
    platform measured (docs/benchmarks.md): on CPU (2 cores) and on one H100
    (2x faster than 'lax' at 10 clients, 10x at 1000: vmapping a convolution
    over per-client kernels makes XLA emit one grouped convolution with a group
    per client, which collapses at large group counts; im2col turns it into
    batched matmuls). Its cost is memory: the patches are kh*kw times the
    input (27 GB vs 13 GB at 1000 clients on the H100; bound it with
    --client_chunk_size). TPU is not measured: 'auto' picks im2col there too,
    since the grouped convolution comes from the same batching rule on every
    backend and batched matmuls are what the TPU's matrix units run; measure
    with `experiments/benchmark.py --preset=sweep --conv_impl=lax` vs im2col
    before relying on it.

Compute dtype: every layer takes `dtype` (float32 or bfloat16). Parameters are
always created and kept in float32 (so are gradients and optimizer state);
with bfloat16 the inputs and kernels are cast to bfloat16 at each layer, so
activations and im2col patches are bfloat16 and matmuls accumulate in float32
(`preferred_element_type`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'lax', 'im2col', 'patches')
COMPUTE_DTYPES = ('float32', 'bfloat16')

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

Padding = str | Sequence[tuple[int, int]]

# PyTorch's default for nn.Conv2d and nn.Linear weights:
# kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps 'auto' to the fastest measured backend (see the module docstring).

  Args:
    conv_impl: One of `CONV_IMPLS`.

  Returns:
    'im2col' for 'auto', else `conv_impl`.

  Raises:
    ValueError: `conv_impl` is not one of `CONV_IMPLS`.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  return 'im2col' if conv_impl == 'auto' else conv_impl


def _torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv_im2col(
  x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
  """Convolution as strided slices of the padded input and one matmul."""
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  windows = [
    x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  # Feature order (i, j, c) matches the row-major flattening of HWIO.
  patches = jnp.concatenate(windows, axis=-1)
  return _matmul(patches, kernel.reshape(kh * kw * cin, cout))


def _conv_patches(
  x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
  """Convolution as `conv_general_dilated_patches` and one matmul."""
  kh, kw, cin, cout = kernel.shape
  patches = lax.conv_general_dilated_patches(
    x, (kh, kw), strides, padding, dimension_numbers=_DIMENSION_NUMBERS
  )
  # The patches' features are channel-major: (c, i, j).
  return _matmul(patches, kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout))


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w over the last axis of x, accumulated in float32, in x's dtype."""
  return lax.dot_general(
    x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  ).astype(x.dtype)


def conv2d(
  x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding, impl: str
) -> jax.Array:
  """2-D cross-correlation of NHWC inputs with an HWIO kernel.

  Args:
    x: Input of shape [batch, height, width, in_channels].
    kernel: Kernel of shape [kh, kw, in_channels, out_channels].
    strides: (stride_h, stride_w).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    impl: One of `CONV_IMPLS`.

  Returns:
    The output, [batch, out_height, out_width, out_channels].
  """
  impl = resolve_conv_impl(impl)
  if impl == 'lax':
    return lax.conv_general_dilated(
      x,
      kernel,
      strides,
      padding,
      dimension_numbers=_DIMENSION_NUMBERS,
      preferred_element_type=jnp.float32,
    ).astype(x.dtype)
  if impl == 'im2col':
    return _conv_im2col(x, kernel, strides, padding)
  return _conv_patches(x, kernel, strides, padding)


class Conv(nn.Module):
  """2-D convolution on NHWC inputs with a selectable backend.

  Attributes:
    features: Number of output channels.
    kernel_size: (kh, kw).
    strides: (stride_h, stride_w).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    use_bias: Whether to add a bias.
    impl: One of `CONV_IMPLS`.
    kernel_init: Initialiser of the [kh, kw, in, out] kernel; PyTorch's
      default unless given.
    dtype: Compute dtype of the input, kernel and output (parameters stay
      float32).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True
  impl: str = 'auto'
  kernel_init: nn.initializers.Initializer = torch_default_kernel_init
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution to x of shape [batch, height, width, in]."""
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (kh, kw, cin, self.features), jnp.float32)
    y = conv2d(
      x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding, self.impl
    )
    if self.use_bias:
      bias = self.param(
        'bias', _torch_default_bias_init(kh * kw * cin), (self.features,), jnp.float32
      )
      y = y + bias.astype(self.dtype)
    return y


class Dense(nn.Module):
  """Fully connected layer with PyTorch's default initialisation.

  Attributes:
    features: Number of outputs.
    dtype: Compute dtype of the input, kernel and output (parameters stay
      float32).
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to x of shape [..., in]."""
    fan_in = x.shape[-1]
    kernel = self.param('kernel', torch_default_kernel_init, (fan_in, self.features), jnp.float32)
    bias = self.param('bias', _torch_default_bias_init(fan_in), (self.features,), jnp.float32)
    return _matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
