"""A tfds builder for Fashion-MNIST from the Debian package `dataset-fashion-mnist`.

`apt-get install -y dataset-fashion-mnist` puts the original IDX files in
`/usr/share/datasets/fashion-mnist/`. Debian rewrote their gzip headers, so the
stock tfds `fashion_mnist` builder rejects them (checksum mismatch); this builder,
registered as `fashion_mnist_debian`, reads them from disk instead (it never
downloads) and has the same features as tfds `fashion_mnist`: `image` (28, 28, 1)
uint8 and `label`, a `ClassLabel` with the 10 official class names. Shuffling is
disabled, so the records keep the order of the IDX files.

Importing this module registers the builder with tfds. No TensorFlow needed.
"""

from collections.abc import Iterator
import gzip
import os
import pathlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

SOURCE_DIR_ENV = 'APFL_FASHION_MNIST_DIR'
DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
# Split name -> (images file, labels file), as named upstream and by Debian.
SOURCE_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = (
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
_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions.
_LABELS_MAGIC = 0x00000801  # IDX: unsigned bytes, 1 dimension.


def source_dir() -> pathlib.Path:
  """Returns the folder holding the IDX files: $APFL_FASHION_MNIST_DIR or the Debian one."""
  return pathlib.Path(os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR)


def missing_source_files(folder: pathlib.Path) -> list[str]:
  """Returns the names of the four IDX files that are not in `folder`."""
  return [name for pair in SOURCE_FILES.values() for name in pair if not (folder / name).is_file()]


def read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes.

  Args:
    path: the `.gz` file.
    magic: the expected magic number (`0x803` for images, `0x801` for labels).

  Returns:
    A uint8 array shaped as the header says.

  Raises:
    ValueError: if the header or the size does not match.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    raise ValueError(f'{path}: IDX magic number {found:#x}, expected {magic:#x}')
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != np.prod(shape):
    raise ValueError(f'{path}: {body.size} bytes of data for shape {shape}')
  return body.reshape(shape)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from the local IDX files of the Debian package."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, source: str | os.PathLike | None = None, **kwargs):
    """Initialises the builder.

    Args:
      source: folder with the four IDX `.gz` files; default `source_dir()`.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (e.g. `data_dir`).
    """
    self._source = pathlib.Path(source) if source else source_dir()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    """The features of tfds `fashion_mnist`, unshuffled."""
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Fashion-MNIST (Zalando article images, 28x28 grayscale, 10 '
        'classes), read from the IDX files of the Debian package '
        'dataset-fashion-mnist, in their original order.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(28, 28, 1)),
          'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }
      ),
      supervised_keys=('image', 'label'),
      disable_shuffling=True,
      homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(
    self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Iterator[tuple[int, dict[str, PIL.Image.Image | int]]]]:
    """Returns the example generators of the 'train' and 'test' splits."""
    del dl_manager  # Everything is on disk already.
    missing = missing_source_files(self._source)
    if missing:
      raise FileNotFoundError(
        f'{self._source} lacks {", ".join(missing)}: apt-get install -y dataset-fashion-mnist'
      )
    return {
      split: self._generate_examples(self._source / images, self._source / labels)
      for split, (images, labels) in SOURCE_FILES.items()
    }

  def _generate_examples(
    self, images_path: pathlib.Path, labels_path: pathlib.Path
  ) -> Iterator[tuple[int, dict[str, PIL.Image.Image | int]]]:
    """Yields (index, {'image': 28x28 grayscale image, 'label': int}).

    The images are handed to tfds as PIL images: tfds encodes those to PNG with
    PIL, while numpy arrays would need TensorFlow.
    """
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if len(images) != len(labels):
      raise ValueError(
        f'{len(images)} images in {images_path} but {len(labels)} labels in {labels_path}'
      )
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': PIL.Image.fromarray(image), 'label': int(label)}
