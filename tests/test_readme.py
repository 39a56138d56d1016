"""The README's Python snippets run as written."""

import pathlib
import re
import tomllib

import jax
import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quickstart():
  assert SNIPPETS
  assert len(SNIPPETS[0].strip().splitlines()) <= 20


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
  namespace: dict = {}
  with jax.numpy_rank_promotion("allow"):  # user code may broadcast a bias; ours may not
    run_snippet(index, namespace)


def run_snippet(index, namespace):
  exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
  if "params" in namespace and "step" in namespace:  # the quickstart: steps lower the loss
    x = jax.random.normal(jax.random.key(0), (64, 512))
    y = jnp.tanh(x[:, :256])
    params, state = namespace["params"], namespace["state"]
    before = float(namespace["loss"](params, x, y))
    for _ in range(20):
      params, state = namespace["step"](params, state, x, y)
    assert float(namespace["loss"](params, x, y)) < before


def test_links_work_on_a_package_index_page():
  """The README is the package's description on PyPI, where relative links and images break:
  every link is absolute and points into the repository named in ``[project.urls]``, at a file
  that exists here."""
  urls = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["urls"]
  home = urls["Repository"].removeprefix("https://github.com/")
  targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
  assert targets
  for target in targets:
    assert target.startswith(("https://", "#")), target
    for prefix in (f"https://raw.githubusercontent.com/{home}/main/",
                   f"https://github.com/{home}/blob/main/"):
      if target.startswith(prefix):
        assert (README.parent / target.removeprefix(prefix)).exists(), target
