"""What a package index would receive: the wheel holds the package, its ``py.typed`` marker and
the licence only; the sdist leaves the measured results out; twine accepts both; the version has
one source; the installed dependencies meet the declared floors."""

import importlib.metadata
import pathlib
import re
import runpy
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import optax_rlx

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  pytest.importorskip("build")
  out = tmp_path_factory.mktemp("dist")
  result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
  if result.returncode != 0 and "hatchling" in result.stdout + result.stderr:
    pytest.skip("no hatchling for the isolated build (offline without a package index)")
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_the_wheel_holds_only_the_package_its_marker_and_the_licence(dist):
  (wheel,) = dist.glob("*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
  package = {n for n in names if n.startswith("optax_rlx/")}
  assert package == {f"optax_rlx/{p.name}" for p in (ROOT / "optax_rlx").glob("*.py")} | {
      "optax_rlx/py.typed"}
  metadata = {n for n in names if ".dist-info/" in n}
  assert {n.split(".dist-info/")[1] for n in metadata} == {
      "METADATA", "WHEEL", "RECORD", "licenses/LICENSE"}


def test_the_sdist_leaves_results_and_builds_out(dist):
  (sdist,) = dist.glob("*.tar.gz")
  with tarfile.open(sdist) as archive:
    names = archive.getnames()
  assert any(n.endswith("optax_rlx/py.typed") for n in names)
  assert not [n for n in names if "benchmarks/results" in n or "_build" in n or "/.ci/" in n]


def test_twine_accepts_both(dist):
  pytest.importorskip("twine")
  result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                           *map(str, dist.iterdir())], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_version_has_one_source():
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert re.search(r"^version\s*=", pyproject, re.M) is None  # dynamic, from __init__.py
  assert importlib.metadata.version("optax_rlx") == optax_rlx.__version__


def test_installed_dependencies_meet_the_declared_floors():
  for requirement in importlib.metadata.requires("optax_rlx"):
    if "extra ==" in requirement:
      continue
    name, floor = re.fullmatch(r"([\w-]+)>=([\d.]+)", requirement.replace(" ", "")).groups()
    installed = importlib.metadata.version(name)
    as_tuple = [tuple(int(x) for x in re.findall(r"\d+", v)[:3]) for v in (installed, floor)]
    assert as_tuple[0] >= as_tuple[1], (name, installed, floor)


def test_ci_installs_every_declared_floor_exactly():
  """``.ci/run``'s floors environment pins what ``pyproject.toml`` declares, nothing else."""
  floors = runpy.run_path(str(ROOT / ".ci" / "floors.py"))["pins"]()
  declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  assert floors == [d.replace(" ", "").replace(">=", "==") for d in declared]
