"""Image classifiers split into a feature extractor ('body') and a 'head'.

Every model is a pure flax.linen module on normalised NHWC float32 images
whose only collection is 'params', with exactly two top-level entries:
'body' and 'head'. Each exposes `__call__(x) -> logits`,
`features(x) -> [batch, feature_dim]`, `head_logits(h) -> logits` (apply with
`method=model.head_logits`) and the int `feature_dim`.
"""

import flax.linen as nn

from apfl_jax.errors import ConfigError
from apfl_jax.models.cnn import FedAvgCNN
from apfl_jax.models.conv import CONV_IMPLS
from apfl_jax.models.resnet import resnet8, resnet18

MODELS = ('cnn', 'resnet8', 'resnet18')


def create_model(name: str, num_classes: int,
                 conv_impl: str = 'auto') -> nn.Module:
  """Builds a model by name.

  Args:
    name: One of `MODELS`.
    num_classes: Number of logits.
    conv_impl: Convolution backend, one of `CONV_IMPLS`: 'lax'
      (lax.conv_general_dilated), 'im2col' (slices and matmul, fast on CPU),
      'patches' (lax.conv_general_dilated_patches and matmul) or 'auto'
      ('im2col' on CPU, else 'lax'). Parameters are the same for all.

  Returns:
    The unbound module.

  Raises:
    ConfigError: Unknown `name` or `conv_impl`.
  """
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(
        f'--conv_impl must be one of {", ".join(CONV_IMPLS)}; '
        f'got {conv_impl!r}')
  if name == 'cnn':
    return FedAvgCNN(num_classes, conv_impl)
  if name == 'resnet8':
    return resnet8(num_classes, conv_impl)
  if name == 'resnet18':
    return resnet18(num_classes, conv_impl)
  raise ConfigError(
      f'--model must be one of {", ".join(MODELS)}; got {name!r}')
