"""CIFAR-style ResNets with GroupNorm: ResNet-8 and ResNet-18.

Layout (He et al. 2016, basic blocks, CIFAR stem): conv 3x3 64, stride 1,
then GroupNorm and ReLU, no max-pool; stages of basic blocks whose first
block strides by 2 (except in the first stage) and uses a 1x1 convolution
plus GroupNorm shortcut when the shape changes; global average pooling gives
the features, and one Dense layer is the head.

  resnet18: stages [2, 2, 2, 2] of 64/128/256/512 channels, feature_dim 512.
  resnet8: stages [1, 1, 1] of 64/128/256 channels, feature_dim 256
    (the stem and 3 blocks of 2 convolutions, plus the head: 8 layers).

Initialisation follows torchvision's ResNet, as used by PFLlib: convolutions
(which have no bias) are kaiming-normal with fan_out, GroupNorm scales are 1
and offsets 0, and the head has PyTorch's default Linear initialisation.
GroupNorm uses min(32, channels) groups.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from apfl_jax.models.conv import Conv, Dense

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _group_norm(channels: int, dtype: jnp.dtype) -> nn.GroupNorm:
  """GroupNorm with min(32, channels) groups (statistics in float32)."""
  return nn.GroupNorm(num_groups=min(32, channels), epsilon=1e-5, dtype=dtype)


def _conv(features: int, size: int, stride: int, impl: str, dtype: jnp.dtype) -> Conv:
  """Bias-free convolution with 'SAME' padding and kaiming-normal init."""
  return Conv(
    features,
    (size, size),
    strides=(stride, stride),
    padding='SAME',
    use_bias=False,
    impl=impl,
    kernel_init=_conv_init,
    dtype=dtype,
  )


class _BasicBlock(nn.Module):
  """Two 3x3 conv-GroupNorm layers with a residual connection.

  Attributes:
    features: Output channels.
    stride: Stride of the first convolution and of the shortcut.
    conv_impl: Convolution backend, one of `conv.CONV_IMPLS`.
    dtype: Compute dtype.
  """

  features: int
  stride: int
  conv_impl: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to NHWC x."""
    y = _conv(self.features, 3, self.stride, self.conv_impl, self.dtype)(x)
    y = nn.relu(_group_norm(self.features, self.dtype)(y))
    y = _conv(self.features, 3, 1, self.conv_impl, self.dtype)(y)
    y = _group_norm(self.features, self.dtype)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, self.conv_impl, self.dtype)(x)
      x = _group_norm(self.features, self.dtype)(x)
    return nn.relu(x + y)


class _ResNetBody(nn.Module):
  """Stem, stages of basic blocks and global average pooling.

  Attributes:
    stage_sizes: Number of blocks per stage.
    stage_features: Channels per stage.
    conv_impl: Convolution backend, one of `conv.CONV_IMPLS`.
    dtype: Compute dtype (the features are returned in float32).
  """

  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  conv_impl: str
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, stage_features[-1]] features."""
    x = _conv(64, 3, 1, self.conv_impl, self.dtype)(x)
    x = nn.relu(_group_norm(64, self.dtype)(x))
    for stage, (blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(features, stride, self.conv_impl, self.dtype)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ResNet(nn.Module):
  """CIFAR-style GroupNorm ResNet with its body and head split.

  Attributes:
    num_classes: Number of logits.
    stage_sizes: Number of basic blocks per stage.
    stage_features: Channels per stage; the last is `feature_dim`.
    conv_impl: Convolution backend, one of `conv.CONV_IMPLS`.
    dtype: Compute dtype of the body; the head and the logits are float32.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    """Creates the 'body' and 'head' submodules."""
    self.body = _ResNetBody(self.stage_sizes, self.stage_features, self.conv_impl, self.dtype)
    self.head = Dense(self.num_classes)

  @property
  def feature_dim(self) -> int:
    """Width of the features, i.e. of the head's input."""
    return self.stage_features[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, num_classes] logits."""
    return self.head(self.body(x))

  def features(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, feature_dim] features (the head's input)."""
    return self.body(x)

  def head_logits(self, h: jax.Array) -> jax.Array:
    """Maps [batch, feature_dim] features to logits."""
    return self.head(h)


def resnet8(num_classes: int, conv_impl: str = 'auto', dtype: jnp.dtype = jnp.float32) -> ResNet:
  """ResNet-8: stem and stages [1, 1, 1] of 64/128/256 channels."""
  return ResNet(num_classes, (1, 1, 1), (64, 128, 256), conv_impl, dtype)


def resnet18(num_classes: int, conv_impl: str = 'auto', dtype: jnp.dtype = jnp.float32) -> ResNet:
  """ResNet-18: stem and stages [2, 2, 2, 2] of 64/128/256/512 channels."""
  return ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), conv_impl, dtype)
