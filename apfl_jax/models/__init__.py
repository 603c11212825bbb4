"""Image classifiers split into a feature extractor ('body') and a 'head'.

Every model is a pure flax.linen module on normalised NHWC float32 images
whose only collection is 'params', with exactly two top-level entries:
'body' and 'head'. Each exposes `__call__(x) -> logits`,
`features(x) -> [batch, feature_dim]`, `head_logits(h) -> logits` (apply with
`method=model.head_logits`) and the int `feature_dim`.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from apfl_jax.core import options
from apfl_jax.core.errors import ConfigError
from apfl_jax.models.cnn import FedAvgCNN
from apfl_jax.models.conv import COMPUTE_DTYPES, CONV_IMPLS
from apfl_jax.models.resnet import resnet8, resnet18

MODELS = ('cnn', 'resnet8', 'resnet18')


def create_model(
  name: str, num_classes: int, conv_impl: str = 'auto', compute_dtype: str = 'float32'
) -> nn.Module:
  """Builds a model by name.

  Args:
    name: One of `MODELS`.
    num_classes: Number of logits.
    conv_impl: Convolution backend, one of `CONV_IMPLS`: 'lax'
      (lax.conv_general_dilated), 'im2col' (slices and matmul, fast on CPU),
      'patches' (lax.conv_general_dilated_patches and matmul) or 'auto'
      ('im2col', see `conv.resolve_conv_impl`). Parameters are the same for all.
    compute_dtype: 'float32' or 'bfloat16' (activations and patches of the body;
      parameters, the head and the logits stay float32).

  Returns:
    The unbound module.

  Raises:
    ConfigError: Unknown `name`, `conv_impl` or `compute_dtype`.
  """
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(f'--conv_impl must be one of {", ".join(CONV_IMPLS)}; got {conv_impl!r}')
  if compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(
      f'--compute_dtype must be one of {", ".join(COMPUTE_DTYPES)}; got {compute_dtype!r}'
    )
  dtype = jnp.dtype(compute_dtype)
  if name == 'cnn':
    return FedAvgCNN(num_classes, conv_impl, dtype)
  if name == 'resnet8':
    return resnet8(num_classes, conv_impl, dtype)
  if name == 'resnet18':
    return resnet18(num_classes, conv_impl, dtype)
  raise ConfigError(f'--model must be one of {", ".join(MODELS)}; got {name!r}')


@dataclasses.dataclass(frozen=True)
class ModelOptions(options.Options):
  """The classifier every client trains."""

  TITLE = 'Model'
  model: str = options.option(
    'cnn',
    'Model architecture.',
    choices=MODELS,
  )
  conv_impl: str = options.option(
    'auto',
    'Convolution kernel: lax, im2col, patches or auto (im2col, the fastest measured on '
    'CPU and on an H100 GPU; see models/conv.py).',
    choices=CONV_IMPLS,
  )
  compute_dtype: str = options.option(
    'float32',
    'float32, or bfloat16: activations and conv patches in bf16 while parameters and '
    'optimizer state stay float32.',
    choices=COMPUTE_DTYPES,
  )
