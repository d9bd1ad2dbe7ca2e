"""The package's import rules, read from its source with `ast` (nothing is imported, so it takes milliseconds):
evaluation never imports training, only convert/ imports convert/ (one named exception), and the parts of
dove_jax (its subpackages and top-level modules) import each other without a cycle. Imports inside functions
count as much as those at the top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# build_model starts from the PyTorch checkpoints config.init.vqgan / init.pythia name: the one conversion
# that runs outside convert/.
CONVERT_IMPORTERS = {("dove_jax.builders", "dove_jax.convert.pretrained")}


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str) -> set[str]:
  """The dove_jax modules `source` (module `module`) imports anywhere in it; `from dove_jax import xla`
  imports dove_jax.xla, `from dove_jax.models.dove import DOVE` dove_jax.models.dove."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = absolute(node, module)
      names.update(
          f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base
          for alias in node.names
      )
  return {name for name in names if name == "dove_jax" or name.startswith("dove_jax.")}


def absolute(node: ast.ImportFrom, module: str) -> str:
  """The module a `from X import ...` in `module` reads from, relative imports ('from ..models import') resolved."""
  if not node.level:
    return node.module
  package = module.split(".")
  if not ROOT.joinpath(*package, "__init__.py").is_file():
    package = package[:-1]
  return ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))


def part(module: str) -> str:
  """dove_jax.training.loop -> dove_jax.training; a top-level module (dove_jax.weights) is its own part."""
  return ".".join(module.split(".")[:2])


def imports_between(
    imports: dict[str, set[str]], importer_part: str, imported_part: str
) -> set[tuple[str, str]]:
  """(importer, imported) module pairs of modules of one part importing modules of the other."""
  return {
      (module, name)
      for module, names in imports.items()
      for name in names
      if part(module) == importer_part and part(name) == imported_part
  }


def import_cycle(imports: dict[str, set[str]]) -> list[str] | None:
  """A cycle of parts (its first part repeated at the end), or None: a depth-first search of the graph of
  parts, an edge for every import from one part into another."""
  edges = {}
  for module, names in imports.items():
    edges.setdefault(part(module), set()).update(
        part(name) for name in names if part(name) != part(module)
    )
  done, path = set(), []

  def visit(node):
    if node in path:
      return path[path.index(node) :] + [node]
    if node in done:
      return None
    path.append(node)
    cycle = next(filter(None, (visit(target) for target in sorted(edges.get(node, ())))), None)
    path.pop()
    done.add(node)
    return cycle

  return next(filter(None, (visit(node) for node in sorted(edges))), None)


IMPORTS = {
    module_name(path): imported_modules(path.read_text(), module_name(path))
    for path in sorted((ROOT / "dove_jax").rglob("*.py"))
}


def test_evaluation_never_imports_training():
  assert imports_between(IMPORTS, "dove_jax.evaluation", "dove_jax.training") == set()


def test_only_convert_imports_convert_but_the_named_exception():
  outside = {
      (module, name)
      for module, names in IMPORTS.items()
      for name in names
      if part(name) == "dove_jax.convert" and part(module) != "dove_jax.convert"
  }
  assert outside == CONVERT_IMPORTERS


def test_no_import_cycle_between_the_parts_of_dove_jax():
  assert import_cycle(IMPORTS) is None


def test_the_rules_see_imports_inside_functions_and_cycles():
  """The checks above fail when such an import is added (here, to a made-up module)."""
  source = "import numpy\nfrom dove_jax import xla\n\ndef f():\n  from dove_jax.training.loop import check_config\n"
  found = imported_modules(source, "dove_jax.evaluation.new")
  assert found == {"dove_jax.xla", "dove_jax.training.loop"}
  assert imports_between(
      {"dove_jax.evaluation.new": found}, "dove_jax.evaluation", "dove_jax.training"
  ) == {("dove_jax.evaluation.new", "dove_jax.training.loop")}
  assert imported_modules(
      "from . import metrics\nfrom ..models.dove import DOVE\n", "dove_jax.evaluation.new"
  ) == {"dove_jax.evaluation.metrics", "dove_jax.models.dove"}
  cyclic = {
      **IMPORTS,
      "dove_jax.weights": IMPORTS["dove_jax.weights"] | {"dove_jax.training.checkpoint"},
  }
  assert import_cycle(cyclic) is not None  # training.loop -> builders -> weights -> training
