"""Model contract: shapes, body/head split, backend equivalence, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apfl_jax.core.errors import ConfigError
from apfl_jax.models import MODELS, create_model

pytestmark = pytest.mark.usefixtures('float32_matmuls')

_NUM_CLASSES = 7
_FEATURE_DIMS = {'cnn': 512, 'resnet8': 256, 'resnet18': 512}
_INPUT_SHAPES = [(2, 28, 28, 1), (2, 32, 32, 3)]


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_models_tuple():
  assert MODELS == ('cnn', 'resnet8', 'resnet18')


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('shape', _INPUT_SHAPES)
def test_shapes_and_param_keys(name, shape):
  model = create_model(name, _NUM_CLASSES)
  x = jnp.zeros(shape)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'body', 'head'}
  assert model.feature_dim == _FEATURE_DIMS[name]
  assert variables['params']['head']['kernel'].shape == (model.feature_dim, _NUM_CLASSES)
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (shape[0], _NUM_CLASSES)
  assert logits.dtype == jnp.float32
  features = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features), variables, x)
  assert features.shape == (shape[0], model.feature_dim)


# The ResNets run at one size only, to keep the test fast; their shapes at both sizes are
# checked above.
@pytest.mark.parametrize(
  'name,shape',
  [
    ('cnn', _INPUT_SHAPES[0]),
    ('cnn', _INPUT_SHAPES[1]),
    ('resnet8', _INPUT_SHAPES[1]),
    ('resnet18', _INPUT_SHAPES[1]),
  ],
)
def test_head_of_features_and_backends_agree(name, shape):
  lax_model = create_model(name, _NUM_CLASSES, conv_impl='lax')
  im2col_model = create_model(name, _NUM_CLASSES, conv_impl='im2col')

  @jax.jit
  def outputs(key, x):
    variables = lax_model.init(key, x)
    h = im2col_model.apply(variables, x, method=im2col_model.features)
    return (
      lax_model.apply(variables, x),
      im2col_model.apply(variables, x),
      im2col_model.apply(variables, h, method=im2col_model.head_logits),
    )

  lax_logits, im2col_logits, split_logits = outputs(jax.random.key(1), _images(shape))
  assert bool(jnp.all(jnp.isfinite(lax_logits)))
  assert float(jnp.std(lax_logits)) > 1e-3
  np.testing.assert_allclose(im2col_logits, lax_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(split_logits, im2col_logits, rtol=1e-5, atol=1e-5)


def _stack_of_three(params):
  """Three distinct parameter sets derived from one, stacked on axis 0."""
  return jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)


@pytest.fixture(scope='module')
def cnn_params():
  model = create_model('cnn', _NUM_CLASSES)
  return jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 28, 28, 1)))['params']


def test_vmap_over_stacked_params_matches_loop(cnn_params):
  model = create_model('cnn', _NUM_CLASSES)
  x = _images((3, 2, 28, 28, 1), seed=2)
  stacked = _stack_of_three(cnn_params)

  def loss(params, x):
    return jnp.mean(model.apply({'params': params}, x) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(stacked, x)
  for i in range(3):
    params_i = jax.tree.map(lambda a, i=i: a[i], stacked)
    value_i, grads_i = value_and_grad(params_i, x[i])
    np.testing.assert_allclose(values[i], value_i, rtol=1e-5, atol=1e-6)
    jax.tree.map(
      lambda g, gi, i=i: np.testing.assert_allclose(g[i], gi, rtol=1e-4, atol=1e-6), grads, grads_i
    )


def test_vmap_resnet_logits_match_loop():
  model = create_model('resnet8', _NUM_CLASSES)
  x = _images((3, 2, 12, 12, 3), seed=4)
  stacked = _stack_of_three(jax.jit(model.init)(jax.random.key(5), x[0]))
  logits = jax.jit(jax.vmap(model.apply))(stacked, x)
  apply = jax.jit(model.apply)
  for i in range(3):
    variables_i = jax.tree.map(lambda a, i=i: a[i], stacked)
    np.testing.assert_allclose(logits[i], apply(variables_i, x[i]), rtol=1e-5, atol=1e-5)


def test_init_is_torch_like(cnn_params):
  first = cnn_params['body']['Conv_0']
  bound = 1 / 5  # 1/sqrt(fan_in), fan_in = 5 * 5 * 1
  assert float(jnp.max(jnp.abs(first['kernel']))) <= bound
  assert float(jnp.max(jnp.abs(first['bias']))) <= bound
  resnet = create_model('resnet8', _NUM_CLASSES)
  params = jax.eval_shape(resnet.init, jax.random.key(5), jnp.zeros((1, 32, 32, 3)))['params']
  assert 'bias' not in params['body']['Conv_0']


def test_bfloat16_keeps_float32_params_and_logits(cnn_params):
  model = create_model('cnn', _NUM_CLASSES, compute_dtype='bfloat16')
  x = _images((4, 28, 28, 1))
  logits = jax.jit(model.apply)({'params': cnn_params}, x)
  assert logits.dtype == jnp.float32
  reference = jax.jit(create_model('cnn', _NUM_CLASSES).apply)({'params': cnn_params}, x)
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x))))(cnn_params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_unknown_names_raise_config_error():
  with pytest.raises(ConfigError, match='--model'):
    create_model('vgg', _NUM_CLASSES)
  with pytest.raises(ConfigError, match='--conv_impl'):
    create_model('cnn', _NUM_CLASSES, conv_impl='cudnn')
  with pytest.raises(ConfigError, match='--compute_dtype'):
    create_model('cnn', _NUM_CLASSES, compute_dtype='float16')
