"""The documentation covers the public API: every name in ``optax_rlx.__all__`` has an entry."""

import inspect
import pathlib
import re

import pytest

import optax_rlx

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_every_public_name_has_an_api_entry():
  api = (DOCS / "api.rst").read_text()
  entries = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)", api, flags=re.M))
  assert entries == set(optax_rlx.__all__)


@pytest.mark.parametrize("name", optax_rlx.__all__)
def test_every_public_name_has_a_docstring_with_a_summary(name):
  doc = getattr(optax_rlx, name).__doc__
  assert doc and doc.strip().splitlines()[0].endswith(".")


def test_every_page_is_in_a_toctree():
  index = (DOCS / "index.md").read_text()
  pages = [p.relative_to(DOCS).with_suffix("").as_posix()
           for p in DOCS.rglob("*.md") if p.name != "index.md" and "_build" not in p.parts]
  assert pages and all(page in index for page in pages), pages


@pytest.mark.parametrize("page", ["guides/recipes.md"])
def test_recipe_pages_run_as_written(page):
  """The page's Python blocks, executed in order in one namespace (each asserts its result)."""
  if "equinox" in (DOCS / page).read_text():
    pytest.importorskip("equinox")
  blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.M | re.S)
  assert blocks
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, page, "exec"), namespace)  # our own docs


@pytest.mark.parametrize("name", [n for n in optax_rlx.__all__
                                  if inspect.isfunction(getattr(optax_rlx, n))])
def test_every_argument_is_described_where_users_look(name):
  """Each parameter of each public function has its own entry in the function's ``Args:``
  (an alias repeats its transform's entries; no "see ..." in place of a description)."""
  fn = getattr(optax_rlx, name)
  doc = fn.__doc__
  section = doc[doc.index("  Args:\n"):doc.index("\n\n", doc.index("  Args:\n"))]
  entries = dict(re.findall(r"^    (\w+): (.*)$", section, flags=re.M))
  same_options = "**options:" in section  # kron_by_leaf: the options the state was made with
  for param in inspect.signature(fn).parameters:
    if same_options and param in optax_rlx.KronOptions.__annotations__:
      continue
    assert param in entries, (name, param)
    assert not entries[param].startswith("see "), (name, param, entries[param])
