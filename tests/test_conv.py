"""The matmul convolution backends agree with lax.conv_general_dilated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apfl_jax.models import conv

pytestmark = pytest.mark.usefixtures('float32_matmuls')

# (input shape, kernel shape, strides, padding), as used by the models.
_CASES = [
  ((2, 12, 12, 1), (5, 5, 1, 4), (1, 1), 'VALID'),
  ((2, 12, 12, 3), (5, 5, 3, 6), (1, 1), 'VALID'),
  ((2, 9, 9, 4), (3, 3, 4, 5), (1, 1), 'SAME'),
  ((2, 9, 9, 4), (3, 3, 4, 5), (2, 2), 'SAME'),
  ((2, 8, 8, 4), (3, 3, 4, 5), (2, 2), 'SAME'),
  ((2, 9, 9, 4), (1, 1, 4, 6), (2, 2), 'SAME'),
  ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), 'VALID'),
  ((2, 7, 7, 2), (3, 3, 2, 3), (1, 2), ((1, 0), (2, 1))),
]


def _inputs(x_shape, k_shape):
  kx, kk, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, k_shape)
  return x, kernel, kc


@pytest.mark.parametrize('impl', ['im2col', 'patches'])
@pytest.mark.parametrize('x_shape,k_shape,strides,padding', _CASES)
def test_forward_and_gradients_match_lax(impl, x_shape, k_shape, strides, padding):
  x, kernel, kc = _inputs(x_shape, k_shape)
  ref = conv.conv2d(x, kernel, strides, padding, 'lax')
  out = conv.conv2d(x, kernel, strides, padding, impl)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)

  cotangent = jax.random.normal(kc, ref.shape)

  def loss(impl_, x_, kernel_):
    return jnp.sum(conv.conv2d(x_, kernel_, strides, padding, impl_) * cotangent)

  ref_dx, ref_dk = jax.grad(loss, argnums=(1, 2))('lax', x, kernel)
  dx, dk = jax.grad(loss, argnums=(1, 2))(impl, x, kernel)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)


def test_module_params_are_shared_across_backends():
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  modules = {
    impl: conv.Conv(4, (3, 3), strides=(2, 2), impl=impl)
    for impl in ('lax', 'im2col', 'patches', 'auto')
  }
  variables = modules['lax'].init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'kernel': (3, 3, 3, 4), 'bias': (4,)}}
  ref = modules['lax'].apply(variables, x)
  for module in modules.values():
    np.testing.assert_allclose(module.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def test_torch_default_init_bounds():
  x = jnp.zeros((1, 8, 8, 16))
  params = conv.Conv(64, (3, 3)).init(jax.random.key(3), x)['params']
  bound = (3 * 3 * 16) ** -0.5
  for leaf in (params['kernel'], params['bias']):
    assert float(jnp.max(jnp.abs(leaf))) <= bound
    assert float(jnp.max(jnp.abs(leaf))) > 0.9 * bound
  dense = conv.Dense(7).init(jax.random.key(4), jnp.zeros((1, 100)))
  assert float(jnp.max(jnp.abs(dense['params']['kernel']))) <= 0.1


def test_resolve_conv_impl():
  assert conv.resolve_conv_impl('auto') == 'im2col'  # the fastest measured everywhere
  assert conv.resolve_conv_impl('lax') == 'lax'
  with pytest.raises(ValueError, match='conv_impl'):
    conv.resolve_conv_impl('cudnn')
  with pytest.raises(ValueError, match='conv_impl'):
    conv.Conv(4, (3, 3), impl='cudnn').init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_bfloat16_computes_in_bfloat16_with_float32_params():
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
  f32 = conv.Conv(4, (3, 3), impl='im2col')
  bf16 = conv.Conv(4, (3, 3), impl='im2col', dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(2), x)
  assert jax.tree.map(lambda a: a.dtype, bf16.init(jax.random.key(2), x)) == jax.tree.map(
    lambda a: a.dtype, variables
  )
  out = bf16.apply(variables, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), f32.apply(variables, x), rtol=0.05, atol=0.05)
