"""The code's layering: the import graph of `trainer/` is a stack, and validating a config
loads no TensorFlow."""

import ast

from conftest import REPO_ROOT, run_python

PACKAGE = REPO_ROOT / "trainer"


def import_graph() -> dict:
  """{module: modules of trainer/ it imports}, module-level and function-local imports alike."""
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module)
        imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    graph[name] = sorted(m for m in imported if m in modules and m != name)
  return graph


def cycle(graph: dict):
  """One import cycle as [a, b, ..., a], or None."""
  state = {}

  def visit(node, path):
    state[node] = "open"
    for successor in graph[node]:
      if state.get(successor) == "open":
        return path[path.index(successor):] + [successor]
      if successor not in state:
        found = visit(successor, path + [successor])
        if found:
          return found
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 20 and "trainer.config" in graph
  found = cycle(graph)
  assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cycle_finder_finds_one():
  assert cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
  assert cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_validating_a_config_loads_no_tensorflow():
  code = ("import sys\n"
          "from trainer.config import PrepareConfig, TrainConfig\n"
          "config = TrainConfig(data_dir='d', model_dir='gs://b/m', task='implicit_softmax',"
          " model='mf', target_metric='hr_full', target_value=0.5).validate()\n"
          "assert config.resolved_export_dir == 'gs://b/m/export', config.resolved_export_dir\n"
          "assert config.examples_per_positive == 1\n"
          "PrepareConfig(output_dir='o').validate()\n"
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'keras', 'numpy'))\n"
          "assert not loaded, loaded\n")
  run_python(code)
