"""Tests of apfl_jax.data.datasets and the fashion_mnist_debian tfds builder.

Every test uses its own temporary data_dir; nothing is downloaded. tfds data
sets are faked with `tfds.testing.mock_data` on top of real metadata files
(written by `_fake_prepare`), since the class names come from those files.
`mock_data`'s own fake data source cannot serve `__getitems__` in tfds 4.9.10
(it calls `_getitems` without `self`), so the tests hand it their own records
through `as_data_source_fn`.
"""

import gzip
import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from apfl_jax.core.errors import ConfigError, DataUnavailableError
from apfl_jax.data import datasets, fashion_mnist_debian

CIFAR10_NAMES = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)


class _FakeSource(list):
  """A list of records with the batched read of tfds data sources."""

  def __getitems__(self, keys):
    return [self[key] for key in keys]


def _fake_prepare(
  root: pathlib.Path,
  tfds_name: str,
  sizes: dict[str, int],
  class_names: tuple[str, ...] | None = None,
) -> None:
  """Writes the metadata files and empty shards that `tfds build` would leave in root."""
  with tfds.testing.mock_data(data_dir=str(root)):  # Keeps tfds off GCS.
    builder = tfds.builder(tfds_name, data_dir=root)
  info = builder.info
  if class_names:
    info.features['label'].names = class_names
  info.set_file_format('array_record', override=True)
  folder = pathlib.Path(builder.data_dir)
  template = tfds.core.ShardedFileTemplate(
    data_dir=folder, dataset_name=builder.name, filetype_suffix='array_record'
  )
  info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=split,
          shard_lengths=[size],
          num_bytes=0,
          filename_template=template.replace(split=split),
        )
        for split, size in sizes.items()
      ]
    )
  )
  folder.mkdir(parents=True)
  info.write_to_directory(folder)
  for split in sizes:
    (folder / f'{builder.name}-{split}.array_record-00000-of-00001').touch()


def _mock_records(data_dir: pathlib.Path, records: dict[str, list[dict]]):
  """`mock_data` serving `records` (split -> list of decoded examples), metadata from data_dir."""

  def as_data_source(builder, split, **kwargs):
    del builder, kwargs
    if isinstance(split, str):
      return _FakeSource(records[split])
    return [_FakeSource(records[name]) for name in split]

  return tfds.testing.mock_data(data_dir=str(data_dir), as_data_source_fn=as_data_source)


def _random_records(rng, num, shape, labels):
  return [
    {'image': rng.integers(0, 256, shape, dtype=np.uint8), 'label': labels[i]} for i in range(num)
  ]


def _stack(records):
  return (
    np.stack([r['image'] for r in records]),
    np.array([r['label'] for r in records], np.int32),
  )


def test_cifar10_from_mocked_tfds_then_from_cache(tmp_path):
  rng = np.random.default_rng(0)
  records = {
    'train': _random_records(rng, 12, (32, 32, 3), np.arange(12) % 10),
    'test': _random_records(rng, 5, (32, 32, 3), np.arange(5) * 2),
  }
  _fake_prepare(tmp_path, 'cifar10', {'train': 12, 'test': 5}, CIFAR10_NAMES)
  with _mock_records(tmp_path, records):
    dataset = datasets.load_dataset('cifar10', data_dir=tmp_path)

  assert dataset.name == 'cifar10'
  assert dataset.class_names == CIFAR10_NAMES
  assert dataset.num_classes == 10
  assert dataset.image_shape == (32, 32, 3)
  for images, labels, split in [
    (dataset.train_images, dataset.train_labels, 'train'),
    (dataset.test_images, dataset.test_labels, 'test'),
  ]:
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    want_images, want_labels = _stack(records[split])
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  scaled = dataset.train_images / 255
  assert dataset.mean.dtype == np.float32 and dataset.std.dtype == np.float32
  np.testing.assert_allclose(dataset.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(dataset.std, scaled.std(axis=(0, 1, 2)), rtol=1e-5)

  # Without the mock the shards are empty: only the cache can answer.
  assert len(list((tmp_path / datasets.CACHE_DIRNAME).glob('cifar10-*.npz'))) == 1
  cached = datasets.load_dataset('cifar10', data_dir=tmp_path)
  assert cached.class_names == CIFAR10_NAMES
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(cached, field), getattr(dataset, field))
    assert getattr(cached, field).dtype == getattr(dataset, field).dtype


def test_emnist_letters_are_upright_with_contiguous_labels(tmp_path):
  rng = np.random.default_rng(1)
  # tfds emnist/letters labels run from 1 ('A/a') to 26 ('Z/z').
  records = {
    'train': _random_records(rng, 26, (28, 28, 1), np.arange(1, 27)),
    'test': _random_records(rng, 3, (28, 28, 1), [1, 2, 26]),
  }
  _fake_prepare(tmp_path, 'emnist/letters', {'train': 26, 'test': 3})
  with _mock_records(tmp_path, records):
    dataset = datasets.load_dataset('emnist_letters', data_dir=tmp_path)

  assert dataset.num_classes == 26
  assert dataset.class_names[0] == 'A/a' and dataset.class_names[-1] == 'Z/z'
  np.testing.assert_array_equal(dataset.train_labels, np.arange(26))
  np.testing.assert_array_equal(dataset.test_labels, [0, 1, 25])
  want_images, _ = _stack(records['test'])
  np.testing.assert_array_equal(dataset.test_images, want_images.transpose(0, 2, 1, 3))


def test_emnist_balanced_class_names_are_the_characters(tmp_path):
  rng = np.random.default_rng(3)
  records = {
    'train': _random_records(rng, 47, (28, 28, 1), np.arange(47)),
    'test': _random_records(rng, 2, (28, 28, 1), [0, 46]),
  }
  _fake_prepare(tmp_path, 'emnist/balanced', {'train': 47, 'test': 2})
  with _mock_records(tmp_path, records):
    dataset = datasets.load_dataset('emnist_balanced', data_dir=tmp_path)

  assert dataset.num_classes == 47
  assert ''.join(dataset.class_names) == ('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt')
  np.testing.assert_array_equal(dataset.train_labels, np.arange(47))


@pytest.mark.parametrize('name', datasets.DATASETS)
def test_missing_dataset_fails_fast_with_one_line(name, tmp_path, monkeypatch):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  monkeypatch.setenv(fashion_mnist_debian.SOURCE_DIR_ENV, str(tmp_path / 'no-debian-files'))
  start = time.monotonic()
  with pytest.raises(DataUnavailableError) as error:
    datasets.load_dataset(name, data_dir=data_dir)
  assert time.monotonic() - start < 3
  message = str(error.value)
  assert '\n' not in message
  assert repr(name) in message and str(data_dir) in message
  if name == 'fashion_mnist':
    assert 'apt-get install -y dataset-fashion-mnist' in message
  assert not any(data_dir.iterdir())  # Nothing was downloaded or created.


def test_dataset_prepared_as_tfrecord_only_is_unavailable(tmp_path):
  folder = tmp_path / 'mnist' / '3.0.1'
  folder.mkdir(parents=True)
  (folder / 'dataset_info.json').write_text('{}')
  (folder / 'mnist-train.tfrecord-00000-of-00001').touch()
  with pytest.raises(DataUnavailableError, match='not as array_record'):
    datasets.load_dataset('mnist', data_dir=tmp_path)


def test_unknown_name_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='svhn'):
    datasets.load_dataset('svhn', data_dir=tmp_path)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (magic 0x08 0x<ndim>)."""
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
    size.to_bytes(4, 'big') for size in array.shape
  )
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_debian_builder_gives_back_the_idx_files(tmp_path, monkeypatch):
  rng = np.random.default_rng(2)
  source = tmp_path / 'debian'
  source.mkdir()
  written = {}
  for split, size in [('train', 7), ('test', 4)]:
    images = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size, dtype=np.uint8)
    images_file, labels_file = fashion_mnist_debian.SOURCE_FILES[split]
    _write_idx(source / images_file, images)
    _write_idx(source / labels_file, labels)
    written[split] = images, labels
  monkeypatch.setenv(fashion_mnist_debian.SOURCE_DIR_ENV, str(source))

  data_dir = tmp_path / 'data'
  data_dir.mkdir()  # a --data_dir that does not exist is refused, not created
  dataset = datasets.load_dataset('fashion_mnist', data_dir=data_dir)

  assert dataset.class_names == fashion_mnist_debian.CLASS_NAMES
  assert dataset.class_names[0] == 'T-shirt/top'
  assert (data_dir / 'fashion_mnist_debian' / '1.0.0' / 'dataset_info.json').is_file()
  for split in ('train', 'test'):
    images, labels = written[split]
    got_images = getattr(dataset, f'{split}_images')
    got_labels = getattr(dataset, f'{split}_labels')
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images, images[..., None])
    np.testing.assert_array_equal(got_labels, labels)


def test_real_debian_fashion_mnist(monkeypatch):
  source = pathlib.Path(fashion_mnist_debian.DEFAULT_SOURCE_DIR)
  if fashion_mnist_debian.missing_source_files(source):
    pytest.skip(
      'Fashion-MNIST Debian files not installed: apt-get install -y dataset-fashion-mnist'
    )
  monkeypatch.delenv(fashion_mnist_debian.SOURCE_DIR_ENV, raising=False)
  # The default data folder, which install.sh prepares (built here, once, if it did not;
  # the build itself is tested on small IDX files above).
  dataset = datasets.load_dataset('fashion_mnist')
  assert dataset.train_images.shape == (60000, 28, 28, 1)
  assert dataset.test_images.shape == (10000, 28, 28, 1)
  assert dataset.train_labels.shape == (60000,) and dataset.test_labels.shape == (10000,)
  assert dataset.class_names == (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
  )
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)
  np.testing.assert_allclose(dataset.mean, [0.2860], atol=1e-4)
  np.testing.assert_allclose(dataset.std, [0.3530], atol=1e-4)
