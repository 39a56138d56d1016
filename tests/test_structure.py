"""The library's layout stays readable: module and function sizes, an acyclic import graph, and
one test module per library module.

Limits (issue 9): no module of ``optax_rlx/`` over 600 lines; no function, nested closures
included, over 120 lines of code, where its docstring, blank lines and comment-only lines do not
count.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "optax_rlx"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_CODE_LINES = 120


def _code_lines(node: ast.AST, source_lines: list[str]) -> int:
  """Lines of code of a function: no docstring, no blank or comment-only lines."""
  skip = set()
  body = node.body
  first = body[0] if body else None
  if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
    skip.update(range(first.lineno, first.end_lineno + 1))
  count = 0
  for lineno in range(node.lineno, node.end_lineno + 1):
    text = source_lines[lineno - 1].strip()
    if lineno in skip or not text or text.startswith("#"):
      continue
    count += 1
  return count


def _functions(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      yield node


def function_sizes() -> dict[str, int]:
  """``{'module.py:function': lines of code}`` for every function of the package."""
  sizes = {}
  for path in MODULES:
    source = path.read_text()
    lines = source.splitlines()
    for fn in _functions(ast.parse(source)):
      sizes[f"{path.name}:{fn.name}:{fn.lineno}"] = _code_lines(fn, lines)
  return sizes


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_at_most_600_lines(path):
  assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def test_no_function_over_120_lines_of_code():
  too_long = {name: n for name, n in function_sizes().items() if n > MAX_FUNCTION_CODE_LINES}
  assert not too_long


def test_the_measure_counts_nested_closures_and_skips_docstrings():
  source = (
      'def f():\n  """Doc.\n\n  More.\n  """\n  # note\n  def g():\n    return 1\n\n'
      "  return g\n"
  )
  (f, g) = list(_functions(ast.parse(source)))
  assert _code_lines(f, source.splitlines()) == 4  # def f, def g, return 1, return g
  assert _code_lines(g, source.splitlines()) == 2


def _internal_imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optax_rlx"):
      if node.module == "optax_rlx":
        out.update(f"{a.name}.py" for a in node.names)
      else:
        out.add(node.module.split(".", 1)[1] + ".py")
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".", 1)[1] + ".py" for a in node.names
                 if a.name.startswith("optax_rlx."))
  return out


def test_imports_between_modules_have_no_cycle():
  graph = {p.name: _internal_imports(p) - {"__init__.py"} for p in MODULES}
  done, active = set(), []

  def visit(name):
    assert name not in active, f"import cycle: {' -> '.join([*active, name])}"
    if name in done:
      return
    active.append(name)
    for dep in graph.get(name, ()):
      visit(dep)
    active.pop()
    done.add(name)

  for name in graph:
    visit(name)


def test_plan_module_runs_no_jax_math():
  """The static plan is pure Python and NumPy: it imports neither jax nor optax."""
  imported = set()
  for node in ast.walk(ast.parse((PACKAGE / "_kron_plan.py").read_text())):
    if isinstance(node, ast.Import):
      imported.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or "").split(".")[0])
  assert not imported & {"jax", "optax"}


def test_numerics_modules_use_no_optax_and_no_pytrees():
  for name in ("_kron_numerics.py", "_kron_geometry.py"):
    source = (PACKAGE / name).read_text()
    assert "import optax" not in source
    assert "jax.tree" not in source and "tree_util" not in source


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__init__.py"],
                         ids=lambda p: p.name)
def test_every_module_has_its_test_module(path):
  """``optax_rlx/_x.py`` is tested in ``tests/test_x.py`` (topic suites such as the conformance
  suite come on top)."""
  assert (PACKAGE.parent / "tests" / f"test{path.name}").exists()



def _unannotated(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
  args = fn.args
  params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
  missing = [a.arg for a in params if a is not None and a.annotation is None
             and a.arg not in ("self", "cls")]
  return missing + (["return"] if fn.returns is None else [])


def module_level_functions_missing_annotations(source: str) -> list[str]:
  """``'name: what is missing'`` for the module-level functions and methods of ``source``."""
  found = []
  for node in ast.parse(source).body:
    members = node.body if isinstance(node, ast.ClassDef) else [node]
    for fn in members:
      if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and _unannotated(fn):
        found.append(f"{fn.name}: {', '.join(_unannotated(fn))}")
  return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_level_functions_and_methods_are_annotated(path):
  """Every parameter and return of the package's module-level functions and methods is
  annotated (closures inside them may be left to inference); mypy checks the bodies."""
  assert module_level_functions_missing_annotations(path.read_text()) == []


def test_the_annotation_check_sees_what_is_missing():
  source = "def f(a, b: int) -> int: ...\nclass C:\n  def m(self, x: int): ...\n"
  assert module_level_functions_missing_annotations(source) == ["f: a", "m: return"]
