"""The shape of the package: short functions, shallow nesting, imports that only point down, and
no global effects at import."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = pathlib.Path(ROOT) / "gan"
MAX_LINES = 80
MAX_DEPTH = 5
_BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match)

# Each module's layer: a module imports only modules of lower layers (its own package's
# __init__ aside). The GAN sits in the middle; what runs it on top.
LAYERS = {
  0: ("gan.errors",),
  1: ("gan.parallel", "gan.sampling", "gan.monitoring", "gan.cli", "gan.workdir_lock"),
  2: ("gan.data", "gan.models", "gan.losses", "gan.health.verdict"),
  3: ("gan.metrics",),
  4: ("gan.config", "gan.state", "gan.health.signals", "gan.checkpointing"),
  5: ("gan.step", "gan.rollback"),
  6: ("gan.inference",),
  7: ("gan.trainer",),
}


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  return modules


def _layer(module: str) -> int:
  for layer, prefixes in LAYERS.items():
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return layer
  raise AssertionError(f"{module} has no layer in LAYERS: place it")


def _ours(module: str) -> bool:
  return module == "gan" or module.startswith("gan.")


def _imports(path: pathlib.Path) -> set[str]:
  """The gan modules a file imports (`from gan import x` counts as gan.x where that exists)."""
  modules = _modules()
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if _ours(a.name))
    elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.add(child if child in modules else node.module)
  return found


def _depth(node: ast.AST, depth: int = 0) -> int:
  deepest = depth
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      continue  # measured on its own
    inner = depth + 1 if isinstance(child, _BLOCKS) else depth
    deepest = max(deepest, _depth(child, inner))
  return deepest


def _functions():
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        yield f"{name}.{node.name}", node


def test_no_function_is_longer_than_80_lines():
  long = [
    f"{name} ({node.end_lineno - node.lineno + 1} lines)"
    for name, node in _functions()
    if node.end_lineno - node.lineno + 1 > MAX_LINES
  ]
  assert not long


def test_no_function_nests_deeper_than_5_blocks():
  deep = [f"{name} ({_depth(node)})" for name, node in _functions() if _depth(node) > MAX_DEPTH]
  assert not deep


def test_the_depth_counter_sees_nested_blocks():
  source = "def f():\n" + "".join("  " * (i + 1) + "if x:\n" for i in range(6)) + "  " * 7 + "y\n"
  assert _depth(ast.parse(source).body[0]) == 6


def _package(module: str) -> str:
  return module if module.count(".") == 1 else module.rsplit(".", 1)[0]


def test_every_module_imports_only_modules_below_it():
  upward = []
  for module, path in _modules().items():
    for imported in _imports(path) - {"gan"}:
      # Within one subpackage (gan.data.pipeline -> gan.data.image_folder) layers do not apply.
      if _package(imported) != _package(module) and _layer(imported) >= _layer(module):
        upward.append(f"{module} -> {imported}")
  assert not upward


def test_the_layer_check_sees_an_upward_import():
  assert _layer("gan.trainer") > _layer("gan.checkpointing")
  assert _package("gan.data.pipeline") == _package("gan.data.image_folder") == "gan.data"


def test_checkpointing_knows_nothing_of_collapse_and_scripts_do_not_sample_through_the_trainer():
  assert not {m for m in _imports(PACKAGE / "checkpointing.py") if m.startswith("gan.health")}
  for script in ("sample.py", "evaluate.py"):
    source = (pathlib.Path(ROOT) / "scripts" / script).read_text()
    assert "trainer" not in source and "gan.train" not in source


_IMPORT_ALL = """
import importlib, json, pkgutil
import jax
before = dict(jax.config.values)
import gan
for info in pkgutil.walk_packages(gan.__path__, "gan."):
  importlib.import_module(info.name)
after = jax.config.values
print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))
"""


@pytest.mark.slow
def test_importing_every_gan_module_leaves_jax_config_as_it_was():
  result = subprocess.run(
    [sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []
