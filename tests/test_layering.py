"""The import graph of the project, built from the source: no cycles, imports only go down.

Layers (DESIGN.md), each importing only from its own package or from lower layers:

  data, quant < kernels < models, envs, distributed < search, losses < training, benchmarks < cli
  < experiments, __main__

Imports inside functions count like module-level ones. `losses` imports no model. An experiment
imports no other experiment. Function-level imports of project modules are allowed only for
the modules in `LAZY_ALLOWED` (heavy optional dependencies behind them), each with its reason.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Top-level package of a module -> its layer.
LAYERS = {
  "qstar_jax": 0,  # the root package: only __version__
  "qstar_jax.data": 0,
  "qstar_jax.quant": 0,
  "qstar_jax.kernels": 1,
  "qstar_jax.models": 2,
  "qstar_jax.envs": 2,
  "qstar_jax.distributed": 2,  # meshes and shardings: below every loop and search
  "qstar_jax.search": 3,
  "qstar_jax.losses": 3,
  "qstar_jax.training": 4,
  "qstar_jax.benchmarks": 4,
  "qstar_jax.cli": 5,
  "qstar_jax.__main__": 6,  # `python -m qstar_jax` runs the CLI
  "experiments": 6,
}
# Packages a package may import besides itself and the layers below.
SAME_LAYER_ALLOWED: dict[str, set[str]] = {
  # the mesh errors derive from models.errors.QstarError (the project's one error base)
  "qstar_jax.distributed": {"qstar_jax.models"},
}
# Packages a package may not import although they are lower: losses are pure array functions
# (they may take a batched environment, never a model).
FORBIDDEN = {"qstar_jax.losses": {"qstar_jax.models", "qstar_jax.kernels"}}
# (importing module, imported module) pairs that may stay inside a function, with the reason.
LAZY_ALLOWED = {
  # tensorflow_datasets (optional extra "data") is imported by tfds_builders at module level.
  ("qstar_jax.data.pipeline", "qstar_jax.data.tfds_builders"),
}


def _source_modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for qstar_jax/, kernels/ (installed as qstar_jax.kernels) and
  experiments/."""
  modules = {}
  for folder, prefix in (("qstar_jax", "qstar_jax"), ("kernels", "qstar_jax.kernels"),
                         ("experiments", "experiments")):
    for path in sorted((ROOT / folder).rglob("*.py")):
      parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join([prefix, *parts])] = path
  return modules


MODULES = _source_modules()


def _is_package(name: str) -> bool:
  return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  if not _is_package(module):
    base = base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, bool, int]]:
  """(imported project module, inside a function?, line) for every import statement."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom):
        target = _resolve(module, child)
        # `from pkg import sub` names the submodule when it is one, else the package.
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
                 for a in child.names]
      else:
        visit(child, inside)
        continue
      for name in names:
        # `import a.b.c` imports the deepest project module that exists.
        while name and name not in MODULES:
          name = name.rpartition(".")[0]
        if name and name != module:
          found.append((name, inside, child.lineno))

  visit(tree, False)
  return found


GRAPH = {m: _imports(m) for m in MODULES}


def _package(module: str) -> str:
  if module.startswith("experiments"):
    return "experiments"
  best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
  return best


def test_the_graph_covers_the_source():
  # A broken collector would make every check below pass vacuously.
  assert len(MODULES) > 60
  assert "qstar_jax.kernels.dispatch" in MODULES and "qstar_jax.models.llama" in MODULES
  assert sum(len(v) for v in GRAPH.values()) > 100
  assert all(_package(m) in LAYERS for m in MODULES), [m for m in MODULES
                                                       if _package(m) not in LAYERS]


def test_no_import_cycles():
  # Iterative DFS over modules; reports one cycle with its modules in order.
  color = dict.fromkeys(MODULES, 0)  # 0 new, 1 on the stack, 2 done
  for start in MODULES:
    if color[start]:
      continue
    stack = [(start, iter(sorted({n for n, _, _ in GRAPH[start]})))]
    color[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = 2
        stack.pop()
      elif color[child] == 1:
        cycle = [n for n, _ in stack][[n for n, _ in stack].index(child):] + [child]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      elif color[child] == 0:
        color[child] = 1
        stack.append((child, iter(sorted({n for n, _, _ in GRAPH[child]}))))


def test_imports_go_down_the_layers():
  bad = []
  for module, imports in GRAPH.items():
    src = _package(module)
    for target, _, line in imports:
      dst = _package(target)
      if dst == src:
        continue
      if dst == "experiments" and src == "experiments":
        continue
      ok = (LAYERS[dst] < LAYERS[src] or dst in SAME_LAYER_ALLOWED.get(src, set()))
      ok = ok and dst not in FORBIDDEN.get(src, set())
      # The CLI is an entry point, not a library: only `python -m qstar_jax` imports it.
      ok = ok and (dst != "qstar_jax.cli" or src == "qstar_jax.__main__")
      if not ok:
        bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} "
                   f"(layer {src}={LAYERS[src]} -> {dst}={LAYERS[dst]})")
  assert not bad, "imports up or across the layers (or of the CLI):\n" + "\n".join(bad)


def test_experiments_import_no_other_experiment():
  bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
         for m, imports in GRAPH.items() if m.startswith("experiments.")
         for t, _, line in imports if t.startswith("experiments.")]
  assert not bad, "\n".join(bad)


def test_function_level_imports_of_project_modules_only_where_allowed():
  bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} inside a function"
         for m, imports in GRAPH.items() for t, inside, line in imports
         if inside and (m, t) not in LAZY_ALLOWED]
  assert not bad, ("import at the top of the module (move a shared piece down a layer if it "
                   "cycles):\n" + "\n".join(bad))


def test_the_checker_finds_a_planted_cycle_and_an_upward_import(monkeypatch):
  # The checks above must be able to fail: plant an upward import and a cycle in a copy.
  graph = {"qstar_jax.quant.a": [("qstar_jax.models.b", False, 1)],
           "qstar_jax.models.b": [("qstar_jax.quant.a", True, 7)]}
  modules = {m: ROOT / "x.py" for m in graph}
  this = sys.modules[__name__]
  monkeypatch.setattr(this, "GRAPH", graph)
  monkeypatch.setattr(this, "MODULES", modules)
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycles()
  with pytest.raises(AssertionError, match="qstar_jax.quant=0 -> qstar_jax.models=2"):
    test_imports_go_down_the_layers()
  with pytest.raises(AssertionError, match="inside a function"):
    test_function_level_imports_of_project_modules_only_where_allowed()
