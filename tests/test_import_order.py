"""The import order the README states: the top-level modules of retro_jax import only from modules listed before
them, function-level imports included, and the import graph has no cycle (modules not listed are held to that)."""
import ast
import os

import retro_jax

PACKAGE = os.path.dirname(retro_jax.__file__)
ORDER = ("user_errors", "jsonl", "config_cli", "sharding", "grading", "models", "checkpoint", "tokenization",
         "engine", "search", "train", "eval", "tasks", "view", "plan", "demo", "demo_treecot", "demo_cli", "cli")


def _top_level(name: str) -> str | None:
  parts = name.split(".")
  return parts[1] if parts[0] == "retro_jax" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
  """Top-level module or package of retro_jax -> the others it imports."""
  graph: dict[str, set[str]] = {}
  for root, _, files in os.walk(PACKAGE):
    for file in files:
      if not file.endswith(".py"):
        continue
      path = os.path.join(root, file)
      source = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
      if source == "__init__":
        continue
      targets = graph.setdefault(source, set())
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
          names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
          names = [alias.name for alias in node.names]
        else:
          continue
        targets.update(t for t in map(_top_level, names) if t and t != source and (
            os.path.isdir(os.path.join(PACKAGE, t)) or os.path.isfile(os.path.join(PACKAGE, t + ".py"))))
  return graph


def test_imports_follow_the_stated_order_without_cycles():
  graph = import_graph()
  assert {"models", "engine", "search", "train", "eval"} <= graph.keys()
  backwards = [(a, b) for a, targets in graph.items() for b in targets
               if a in ORDER and b in ORDER and ORDER.index(b) > ORDER.index(a)]
  assert not backwards, f"imports against the README's order: {backwards}"
  assert not graph["train"] & {"engine", "search"}
  done, visiting = set(), []

  def visit(node):
    assert node not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(node):] + [node])}"
    if node not in done:
      visiting.append(node)
      for target in sorted(graph.get(node, ())):
        visit(target)
      visiting.pop()
      done.add(node)

  for node in sorted(graph):
    visit(node)
