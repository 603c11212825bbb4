"""The library's layers import one way: a lower layer never imports a higher one.

core < data, models < algorithms < asynchrony < config < runner < studies. An import under
`if TYPE_CHECKING:` is a type annotation, not a dependency, and is allowed (an algorithm's
`from_config` names the Config type it is given). The package's `__init__` (the public
API, loaded lazily) is above every layer.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'apfl_jax'
LAYERS = {
  'core': 0,
  'data': 1,
  'models': 1,
  'algorithms': 2,
  'asynchrony': 3,
  'config': 4,
  'runner': 5,
  'studies': 6,
}
PLOTTING = ('matplotlib',)


def layer_of(module: str) -> str | None:
  """The layer of a dotted module name below apfl_jax (None: the package itself)."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 and parts[0] == 'apfl_jax' else None


def runtime_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported module) of every import outside `if TYPE_CHECKING:` blocks."""
  tree = ast.parse(path.read_text())
  type_only = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and ast.unparse(node.test) in (
      'TYPE_CHECKING',
      'typing.TYPE_CHECKING',
    ):
      for child in node.body:
        for sub in ast.walk(child):
          type_only.add(id(sub))
  found = []
  for node in ast.walk(tree):
    if id(node) in type_only:
      continue
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      if node.module == 'apfl_jax':  # from apfl_jax import models -> apfl_jax.models
        found += [(node.lineno, f'apfl_jax.{alias.name}') for alias in node.names]
      else:
        found.append((node.lineno, node.module))
  return found


def library_files():
  return sorted(p for p in PACKAGE.rglob('*.py') if p.parent != PACKAGE)


def test_every_library_module_belongs_to_a_layer():
  for path in library_files():
    assert path.relative_to(PACKAGE).parts[0] in LAYERS, path


@pytest.mark.parametrize('path', library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer_or_plots_outside_studies(path):
  own = path.relative_to(PACKAGE).parts[0]
  for line, module in runtime_imports(path):
    target = layer_of(module)
    if module.split('.')[0] in PLOTTING:
      assert own == 'studies', f'{path}:{line} imports {module} outside apfl_jax/studies'
    if target is None and module.startswith('apfl_jax'):
      raise AssertionError(f'{path}:{line} imports the public API {module} from inside')
    if target is not None:
      assert LAYERS[target] <= LAYERS[own], (
        f'{path}:{line}: layer {own} imports {module} of the higher layer {target}'
      )


def test_the_check_catches_an_upward_import(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(
    'from typing import TYPE_CHECKING\nfrom apfl_jax.runner import train\n'
    'if TYPE_CHECKING:\n  from apfl_jax.studies import plots\n'
  )
  assert runtime_imports(bad) == [(1, 'typing'), (2, 'apfl_jax.runner')]
