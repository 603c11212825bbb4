"""Image classification data sets as in-memory numpy arrays, read offline from tfds.

`load_dataset(name)` reads a data set that `tfds build` prepared in the
array_record format (through `tfds` data sources: no TensorFlow, no
`tfds.load`) and never downloads anything: the prepared folder is looked up on
disk before tfds is called at all, and a missing one raises
`DataUnavailableError` at once. Fashion-MNIST can also come from the Debian
package `dataset-fashion-mnist` (see `fashion_mnist_debian`).

Decoding tens of thousands of PNG records takes seconds, so the decoded arrays
are cached in `<data_dir>/apfl_jax_cache/` (one `.npz` per tfds data set and
version, written atomically); later loads read that file.

EMNIST, as tfds stores it, needs two fixes, both applied here:
  * tfds keeps the images of the original EMNIST files, which are transposed
    (mirrored and rotated); they are transposed back, so characters are upright.
  * tfds gives EMNIST class names that are just the label numbers, and
    `emnist/letters` declares 37 classes while its labels are 1..26 (1 = 'A/a',
    label 0 and 27..36 are unused). Letters labels are shifted down by one, so
    they are 0..25, and every EMNIST variant gets the characters of the official
    EMNIST mapping files as class names.
"""

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import fcntl
import functools
import io
import logging
import os
import pathlib
import re
import string
import tempfile
from typing import Any
import zipfile

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from apfl_jax.core import options, sharding
from apfl_jax.core.errors import ConfigError, DataUnavailableError
from apfl_jax.data import fashion_mnist_debian
from apfl_jax.data import partition as partition_lib

# apfl_jax name -> tfds name ('dataset[/config]').
_TFDS_NAMES = {
  'cifar10': 'cifar10',
  'cifar100': 'cifar100',
  'fashion_mnist': 'fashion_mnist',
  'mnist': 'mnist',
  'emnist_balanced': 'emnist/balanced',
  'emnist_letters': 'emnist/letters',
  'emnist_digits': 'emnist/digits',
}
DATASETS = tuple(_TFDS_NAMES)

# Class names of the EMNIST variants, from the official emnist-*-mapping.txt
# files (balanced merges the lowercase letters that look like their capitals;
# letters merges each capital with its lowercase letter).
_EMNIST_CLASS_NAMES = {
  'emnist_balanced': tuple(string.digits + string.ascii_uppercase + 'abdefghnqrt'),
  'emnist_letters': tuple(
    f'{upper}/{lower}' for upper, lower in zip(string.ascii_uppercase, string.ascii_lowercase)
  ),
  'emnist_digits': tuple(string.digits),
}
# tfds emnist/letters labels start at 1 (for 'A/a').
_LABEL_OFFSETS = {'emnist_letters': 1}

CACHE_DIRNAME = 'apfl_jax_cache'
# Bump when what the cache holds changes, so that old cache files are ignored.
_CACHE_FORMAT = 1
# Records decoded per `__getitems__` call: bounds the memory of decoded dicts.
_READ_CHUNK = 10_000
_VERSION_DIR = re.compile(r'\d+\.\d+\.\d+')

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An image classification data set, held in memory.

  Attributes:
    name: the apfl_jax name (one of `DATASETS`).
    train_images: uint8 [N, H, W, C].
    train_labels: int32 [N], in [0, num_classes).
    test_images: uint8 [Nt, H, W, C].
    test_labels: int32 [Nt], in [0, num_classes).
    class_names: human-readable class names ('T-shirt/top', 'airplane'; the
      characters for (E)MNIST), indexed by label.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    """The number of classes."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return self.train_images.shape[1:]

  @property
  def mean(self) -> np.ndarray:
    """Per-channel mean of `train_images / 255`, float32 [C]."""
    return self._moments[0]

  @property
  def std(self) -> np.ndarray:
    """Per-channel (population) standard deviation of `train_images / 255`, float32 [C]."""
    return self._moments[1]

  @functools.cached_property
  def _moments(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of `train_images / 255`, exact, from histograms.

    A histogram of the 256 pixel values per channel avoids making a float copy
    of the whole training set.
    """
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for channel in range(self.train_images.shape[-1]):
      counts = np.bincount(self.train_images[..., channel].ravel(), minlength=256)
      mean = counts @ values / counts.sum()
      means.append(mean)
      stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means, np.float32), np.array(stds, np.float32)


def pooled(dataset: Dataset) -> Dataset:
  """The train and test splits as one pool, which both splits of the result hold.

  For `--test_split=pooled` (PFLlib): the pool is partitioned among clients and each
  client's share is cut into training and test examples, so both index the same arrays
  (one copy; `build_federated_data` moves it to the device once). The normalisation
  moments are then those of the whole pool.
  """
  images = np.concatenate([dataset.train_images, dataset.test_images])
  labels = np.concatenate([dataset.train_labels, dataset.test_labels])
  return Dataset(
    name=dataset.name,
    train_images=images,
    train_labels=labels,
    test_images=images,
    test_labels=labels,
    class_names=dataset.class_names,
  )


def default_data_dir() -> pathlib.Path:
  """Returns $TFDS_DATA_DIR, or ~/tensorflow_datasets when it is not set."""
  return pathlib.Path(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets').expanduser()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads a data set prepared on this machine; never downloads.

  Args:
    name: one of `DATASETS`.
    data_dir: the tfds data folder; default `default_data_dir()`.

  Returns:
    The whole data set in memory. For 'fashion_mnist' it is the stock tfds
    `fashion_mnist` if that is prepared in `data_dir`, otherwise the Debian
    package's files (built once into `data_dir` as `fashion_mnist_debian`).

  An unreadable cache file (truncated, bad CRC) is rebuilt, with one warning line
  naming it.

  Raises:
    ConfigError: `name` is not one of `DATASETS`, or `data_dir` does not exist.
    DataUnavailableError: the data set is not on this machine (or not in the
      array_record format); the one-line message says how to get it.
  """
  if name not in _TFDS_NAMES:
    raise ConfigError(f'unknown dataset {name!r}: expected one of {", ".join(DATASETS)}')
  root = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
  if data_dir and not root.is_dir():
    raise ConfigError(f'--data_dir: folder {root} does not exist')
  if not sharding.in_job():
    return _load_unlocked(name, root)
  # A multi-process run: process 0 prepares the data set (builds, decodes, caches) while
  # the others wait; they then read what it wrote, or, with a data dir of their own,
  # prepare it there one process at a time (`_prepare_lock`).
  dataset = _load_prepared(name, root) if sharding.is_main_process() else None
  sharding.barrier('apfl_jax: data set prepared')
  return dataset or _load_prepared(name, root)


@contextlib.contextmanager
def _prepare_lock(root: pathlib.Path) -> Iterator[None]:
  """Lets one process of this host at a time prepare data in `root` (an flock).

  A read-only data dir is only read: there the lock is skipped.
  """
  try:
    (root / CACHE_DIRNAME).mkdir(parents=True, exist_ok=True)
    lock = open(root / CACHE_DIRNAME / '.prepare.lock', 'a')  # noqa: SIM115
  except OSError:
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _load_prepared(name: str, root: pathlib.Path) -> Dataset:
  """`load_dataset` in `root`: the cache, or the tfds files decoded (and cached)."""
  with _prepare_lock(root):
    return _load_unlocked(name, root)


def _load_unlocked(name: str, root: pathlib.Path) -> Dataset:
  tfds_name, version = _locate(name, root)
  cache_path = (
    root / CACHE_DIRNAME / f'{tfds_name.replace("/", "-")}-{version}-v{_CACHE_FORMAT}.npz'
  )
  if cache_path.is_file():
    try:
      return _read_cache(name, cache_path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      _log.warning(
        'Data cache %s is unreadable (%s: %s); rebuilding it',
        cache_path,
        type(e).__name__,
        str(e).splitlines()[0] if str(e) else '',
      )
      cache_path.unlink(missing_ok=True)
  dataset = _read_tfds(name, tfds_name, version, root)
  _write_cache(dataset, cache_path)
  return dataset


def _locate(name: str, root: pathlib.Path) -> tuple[str, str]:
  """Finds the prepared tfds data set to read for `name`, on disk only.

  Returns:
    (tfds name, version), e.g. ('emnist/balanced', '3.1.0').

  Raises:
    DataUnavailableError: nothing usable is prepared (and, for Fashion-MNIST,
      the Debian files are missing too).
  """
  tfds_name = _TFDS_NAMES[name]
  version = _prepared_version(name, tfds_name, root)
  if version:
    return tfds_name, version
  build_hint = (
    f'on a machine with internet run `pip install tensorflow tensorflow-datasets && '
    f'tfds build {tfds_name} --file_format=array_record --data_dir=DIR` (tfds build '
    f'needs TensorFlow) and copy DIR/{tfds_name.split("/")[0]} into {root}, or pass '
    '--data_dir'
  )
  if name != 'fashion_mnist':
    raise DataUnavailableError(f'dataset {name!r} is not prepared in {root}: {build_hint}')
  debian_name = fashion_mnist_debian.FashionMnistDebian.name
  version = _prepared_version(name, debian_name, root)
  if version:
    return debian_name, version
  source = fashion_mnist_debian.source_dir()
  if fashion_mnist_debian.missing_source_files(source):
    raise DataUnavailableError(
      f'dataset {name!r} is not prepared in {root} and its Debian files are '
      f'not in {source}: `apt-get install -y dataset-fashion-mnist` (or set '
      f'${fashion_mnist_debian.SOURCE_DIR_ENV}), or {build_hint}'
    )
  return debian_name, _build_debian_fashion_mnist(source, root)


def _prepared_version(name: str, tfds_name: str, root: pathlib.Path) -> str | None:
  """Returns the newest version of `tfds_name` prepared as array_record in `root`.

  Looks at the files only (`<root>/<tfds_name>/<version>/dataset_info.json`
  and its `*.array_record-*` shards), so it is fast and offline.

  Raises:
    DataUnavailableError: the data set is prepared, but only in another file
      format (tfds data sources need array_record).
  """
  folder = root / tfds_name
  if not folder.is_dir():
    return None
  prepared = sorted(
    (
      path
      for path in folder.iterdir()
      if _VERSION_DIR.fullmatch(path.name) and (path / 'dataset_info.json').is_file()
    ),
    key=lambda path: tuple(int(part) for part in path.name.split('.')),
    reverse=True,
  )
  for path in prepared:
    if any(path.glob('*.array_record-*')):
      return path.name
  if prepared:
    raise DataUnavailableError(
      f'dataset {name!r} is prepared in {prepared[0]} but not as array_record: '
      f'run `tfds build {tfds_name} --file_format=array_record '
      f'--data_dir={root}` (it needs internet and TensorFlow: `pip install tensorflow`), '
      'or pass --data_dir'
    )
  return None


def _build_debian_fashion_mnist(source: pathlib.Path, root: pathlib.Path) -> str:
  """Prepares `fashion_mnist_debian` from the IDX files in `source`; returns its version."""
  _log.info('Preparing fashion_mnist_debian in %s from %s', root, source)
  builder = fashion_mnist_debian.FashionMnistDebian(data_dir=root, source=source)
  with tempfile.TemporaryDirectory() as download_dir, _quiet_tfds():  # Stays empty.
    builder.download_and_prepare(
      download_dir=download_dir,
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  return str(builder.version)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Silences tfds while it builds or decodes: its prints, progress bars and warnings.

  (They are 'Downloading and preparing dataset Unknown size', raw progress-bar escape
  codes and an OpenCV advice; the caller says what is happening in one line.)
  """
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)
    absl_logging.set_verbosity(verbosity)


def _read_tfds(name: str, tfds_name: str, version: str, root: pathlib.Path) -> Dataset:
  """Decodes the train and test splits of a prepared tfds data set."""
  _log.info('Decoding %s:%s from %s', tfds_name, version, root)
  builder = tfds.builder(f'{tfds_name}:{version}', data_dir=root)
  sources = builder.as_data_source(split=['train', 'test'])
  with _quiet_tfds():
    (train_images, train_labels), (test_images, test_labels) = (
      _read_split(source) for source in sources
    )
  offset = _LABEL_OFFSETS.get(name, 0)
  class_names = _EMNIST_CLASS_NAMES.get(name, tuple(builder.info.features['label'].names))
  for labels in (train_labels, test_labels):
    labels -= offset
    if labels.min() < 0 or labels.max() >= len(class_names):
      raise ValueError(
        f'{tfds_name}:{version} has labels in [{labels.min() + offset}, '
        f'{labels.max() + offset}], expected [{offset}, '
        f'{len(class_names) + offset})'
      )
  if name.startswith('emnist_'):
    # tfds EMNIST images are transposed, as in the original files.
    train_images, test_images = (
      np.ascontiguousarray(images.transpose(0, 2, 1, 3)) for images in (train_images, test_images)
    )
  return Dataset(name, train_images, train_labels, test_images, test_labels, class_names)


def _read_split(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole tfds data source into (uint8 images, int32 labels).

  Args:
    source: a tfds data source of {'image', 'label'} records; besides the
      `Sequence` methods it needs `__getitems__` (batched reads: three times
      faster than one `__getitem__` per record).
  """
  size = len(source)
  first = source[0]
  images = np.empty((size, *first['image'].shape), np.uint8)
  labels = np.empty((size,), np.int32)
  for start in range(0, size, _READ_CHUNK):
    stop = min(start + _READ_CHUNK, size)
    records = source.__getitems__(list(range(start, stop)))  # type: ignore[attr-defined]
    for index, record in enumerate(records, start):
      images[index] = record['image']
      labels[index] = record['label']
  return images, labels


def _read_cache(name: str, path: pathlib.Path) -> Dataset:
  """Reads a `Dataset` written by `_write_cache`."""
  with np.load(path) as arrays:
    return Dataset(
      name=name,
      train_images=arrays['train_images'],
      train_labels=arrays['train_labels'],
      test_images=arrays['test_images'],
      test_labels=arrays['test_labels'],
      class_names=tuple(str(c) for c in arrays['class_names']),
    )


def _write_cache(dataset: Dataset, path: pathlib.Path) -> None:
  """Writes `dataset` to `path` atomically; a failure only logs a warning."""
  tmp_name = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.chmod(tmp_name, 0o644)  # mkstemp makes it private.
    with os.fdopen(fd, 'wb') as f:
      np.savez(
        f,
        train_images=dataset.train_images,
        train_labels=dataset.train_labels,
        test_images=dataset.test_images,
        test_labels=dataset.test_labels,
        class_names=np.array(dataset.class_names, dtype=np.str_),
      )
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)
  except OSError as e:
    _log.warning('Could not cache %s in %s: %s', dataset.name, path, e)
  finally:
    if tmp_name and os.path.exists(tmp_name):
      os.unlink(tmp_name)


def _at_least_one(name: str, value: int) -> None:
  if value < 1:
    raise ConfigError(f'--{name} must be >= 1, got {value}')


def _open_unit(name: str, value: float) -> None:
  if not 0.0 < value < 1.0:
    raise ConfigError(f'--{name} must be in (0, 1), got {value}')


@dataclasses.dataclass(frozen=True)
class DataOptions(options.Options):
  """The data set and how it is split among clients."""

  TITLE = 'Data and partition'
  dataset: str = options.option(
    'fashion_mnist',
    'Data set name.',
    choices=DATASETS,
  )
  data_dir: str = options.option(
    '',
    'tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).',
  )
  num_clients: int = options.option(
    20,
    'Number of clients the data is split among.',
    check=options.positive,
  )
  partition: str = options.option(
    'dirichlet',
    'How the training data is split among clients.',
    choices=partition_lib.PARTITIONS,
  )
  dirichlet_alpha: float = options.option(
    0.1,
    'Concentration of the per-class Dirichlet split (smaller = more skew).',
    check=options.positive,
  )
  classes_per_client: int = options.option(
    2,
    'Classes per client for --partition=pathological/monopoly.',
    check=options.positive,
  )
  min_samples_per_client: int = options.option(
    10,
    'Dirichlet split is redrawn until every client has this many.',
    check=_at_least_one,
  )
  monopoly_clients: int = options.option(
    1,
    'With --partition=monopoly: the last N clients own classes nobody else has.',
  )
  monopoly_classes_per_client: int = options.option(
    2,
    'With --partition=monopoly: classes each monopoly client owns.',
    check=options.positive,
  )
  test_split: str = options.option(
    'proportional',
    'proportional: client test sets are drawn from the test split in proportion to each '
    "client's label mix; pooled: train and test splits are pooled, partitioned, and each "
    "client's share is split --client_train_fraction / rest (PFLlib).",
    choices=partition_lib.TEST_SPLITS,
  )
  client_train_fraction: float = options.option(
    0.75,
    "With --test_split=pooled: the training fraction of each client's share.",
    check=_open_unit,
  )

  def check(self, config: Any) -> None:
    if self.partition == 'monopoly' and not 1 <= self.monopoly_clients < self.num_clients:
      raise ConfigError(
        f'--monopoly_clients must be in [1, --num_clients={self.num_clients}), '
        f'got {self.monopoly_clients}'
      )
