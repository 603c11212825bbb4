"""FedAvgCNN, the two-convolution network of PFLlib and the FedAvg paper."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from apfl_jax.models.conv import Conv, Dense

_FEATURE_DIM = 512


class _CNNBody(nn.Module):
  """Conv-ReLU-pool twice, then Dense 512 and ReLU.

  Attributes:
    conv_impl: Convolution backend, one of `conv.CONV_IMPLS`.
    dtype: Compute dtype of the layers (the features are returned in float32).
  """

  conv_impl: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, 512] features."""
    for features in (32, 64):
      x = Conv(features, (5, 5), padding='VALID', impl=self.conv_impl, dtype=self.dtype)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.relu(Dense(_FEATURE_DIM, dtype=self.dtype)(x)).astype(jnp.float32)


class FedAvgCNN(nn.Module):
  """PFLlib's FedAvgCNN with its body and head split.

  Conv 5x5 32 (VALID) - ReLU - MaxPool 2 - Conv 5x5 64 (VALID) - ReLU -
  MaxPool 2 - flatten (1024 for 28x28 inputs, 1600 for 32x32) - Dense 512 -
  ReLU form the body; the head is one Dense layer. All layers use PyTorch's
  default initialisation, as PFLlib does.

  Attributes:
    num_classes: Number of logits.
    conv_impl: Convolution backend, one of `conv.CONV_IMPLS`.
    dtype: Compute dtype of the body; the head and the logits are float32.
  """

  num_classes: int
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  feature_dim = _FEATURE_DIM

  def setup(self) -> None:
    """Creates the 'body' and 'head' submodules."""
    self.body = _CNNBody(self.conv_impl, self.dtype)
    self.head = Dense(self.num_classes)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, num_classes] logits."""
    return self.head(self.body(x))

  def features(self, x: jax.Array) -> jax.Array:
    """Maps NHWC images to [batch, feature_dim] features (the head's input)."""
    return self.body(x)

  def head_logits(self, h: jax.Array) -> jax.Array:
    """Maps [batch, feature_dim] features to logits."""
    return self.head(h)
