"""Prints the dependency floors of ``pyproject.toml`` as exact pins (``jax>=0.7.0`` ->
``jax==0.7.0``), one per line, for ``.ci/run`` to install in a separate environment."""

import pathlib
import re
import tomllib

_PROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def pins() -> list[str]:
  deps = tomllib.loads(_PROJECT.read_text())["project"]["dependencies"]
  out = []
  for dep in deps:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", dep.strip())
    if match is None:
      raise ValueError(f"dependency {dep!r} has no '>=' floor to pin")
    out.append(f"{match[1]}=={match[2]}")
  return out


if __name__ == "__main__":
  print("\n".join(pins()))
