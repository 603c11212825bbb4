"""Measures how the sentence template changes the separation of class embeddings.

Run: python experiments/embedding_separation.py [--kind minilm|clip]

For Fashion-MNIST and CIFAR-10 class names and several templates it prints:
  mean: mean off-diagonal cosine (lower = classes further apart);
  min_gap: 1 - the largest off-diagonal cosine (the closest pair's margin);
  rho: Spearman correlation of all off-diagonal cosines with those of the raw
    names '{}' (1 = the semantic order of the raw names is kept);
  key pairs, whose order must survive (e.g. Sandal-Sneaker > Sandal-Coat).
"""

import argparse
import sys
import time

import numpy as np

# Run as a script from anywhere: make the repository root importable.
from apfl_jax.algorithms.generative.embeddings import DEFAULT_TEMPLATE, load_text_encoder
from apfl_jax.core.errors import UserError
from apfl_jax.data import fashion_mnist_debian

FASHION_MNIST = fashion_mnist_debian.CLASS_NAMES
CIFAR10 = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
# (dataset name, class names, key pairs as (close pair, far pair)).
DATASETS = (
  (
    'Fashion-MNIST',
    FASHION_MNIST,
    ((('Sandal', 'Sneaker'), ('Sandal', 'Coat')), (('Shirt', 'T-shirt/top'), ('Shirt', 'Bag'))),
  ),
  (
    'CIFAR-10',
    CIFAR10,
    ((('automobile', 'truck'), ('automobile', 'frog')), (('cat', 'dog'), ('cat', 'ship'))),
  ),
)
TEMPLATES = (
  '{}',
  'a {}',
  '{}.',
  'a photo of a {}.',
  'a picture of a {}.',
  'an image of a {}.',
  'a black and white photo of a {}.',
  'a photo of a {}, a type of clothing.',
  'a black and white photo of a {}, a type of clothing.',
)


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks of x (ties broken by order; cosines rarely tie)."""
  ranks = np.empty(len(x))
  ranks[np.argsort(x)] = np.arange(len(x))
  return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation."""
  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _short(name: str) -> str:
  """A 3-letter column label."""
  return name.replace('T-shirt/top', 'Tsh').replace('automobile', 'Aut')[:3].title()


def report(encode, name: str, classes: tuple[str, ...], pairs) -> None:
  """Prints one dataset's table."""
  off = ~np.eye(len(classes), dtype=bool)
  index = {c: i for i, c in enumerate(classes)}
  reference = None
  header = ' '.join(f'{_short(a)}-{_short(b)}' for close, far in pairs for a, b in (close, far))
  print(f'\n{name}')
  print(f'{"template":56s} {"mean":>5s} {"min_gap":>7s} {"rho":>5s}  {header}  order kept')
  for template in TEMPLATES:
    emb = encode([template.format(c) for c in classes])
    cos = emb @ emb.T
    if reference is None:
      reference = cos[off]
    cells, kept = [], []
    for close, far in pairs:
      c_close = cos[index[close[0]], index[close[1]]]
      c_far = cos[index[far[0]], index[far[1]]]
      cells += [f'{c_close:7.2f}', f'{c_far:7.2f}']
      kept.append(c_close > c_far)
    marker = ' <- default' if template == DEFAULT_TEMPLATE else ''
    print(
      f'{template!r:56s} {cos[off].mean():5.2f} {1 - cos[off].max():7.2f} '
      f'{_spearman(cos[off], reference):5.2f}  {" ".join(cells)}  '
      f'{"yes" if all(kept) else "NO"}{marker}'
    )


def main() -> None:
  """Parses flags, loads the encoder once and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kind', default='minilm', choices=('minilm', 'clip'))
  parser.add_argument(
    '--model_name', default=None, help='CLIP hub id or local directory (clip only)'
  )
  args = parser.parse_args()
  start = time.perf_counter()
  try:
    encode = load_text_encoder(args.kind, args.model_name)
  except UserError as e:
    sys.exit(f'error: {e}')
  print(f'{args.kind}: loaded in {time.perf_counter() - start:.1f} s')
  for name, classes, pairs in DATASETS:
    report(encode, name, classes, pairs)


if __name__ == '__main__':
  main()
