"""benchmarks/compare.py stays runnable: a tiny run writes its table, JSON and plot."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_compare_smoke_run_writes_table_json_and_plot(tmp_path):
  pytest.importorskip("sklearn")
  pytest.importorskip("matplotlib")
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--problems",
       "rosenbrock,least_squares", "--optimizers", "optax.adam,optax_rlx.kron,optax_rlx.adafactor",
       "--steps-scale", "0.1", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "#### rosenbrock" in result.stdout and "| optax_rlx.kron |" in result.stdout
  report = json.loads((tmp_path / "compare_quick.json").read_text())
  results = report["problems"]["least_squares"]["results"]
  assert [r["optimizer"] for r in results] == ["optax.adam", "optax_rlx.kron",
                                                "optax_rlx.adafactor"]
  assert all(r["ms_per_step"] > 0 and len(r["curve"]) == 50 for r in results)
  assert (tmp_path / "compare_quick.png").stat().st_size > 10_000
  assert (tmp_path / "compare_quick.md").read_text().count("| optax.adam |") == 2


def test_the_test_extra_brings_every_kron_baseline():
  """``pip install -e ".[test]"`` must make every other Kron port importable (psgd_jax imports
  chex, which it does not declare; distributed_kron needs the PartitionSpec shim on current JAX
  and flax); otherwise compare.py and kron_speed.py silently drop the baseline."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import _baselines
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  assert callable(_baselines.import_psgd_jax_kron())
  assert callable(_baselines.import_psgdax_kron())
  assert callable(_baselines.import_distributed_kron_pro())


def test_every_kron_port_runs_in_compare(tmp_path):
  """Each baseline trains (finite, decreasing loss) in compare.py's own loop (one mode each: the
  modes are one keyword apart; CI time)."""
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--problems", "least_squares",
       "--optimizers", "psgdax.kron(QUAD),distributed_kron.pro,optax.contrib.muon",
       "--seeds", "1", "--steps-scale", "0.1",
       "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "compare.json").read_text())["problems"]["least_squares"]
  for r in results["results"]:
    assert math.isfinite(r["final_loss"]) and r["final_loss"] < 0.5, r["optimizer"]
  assert len(results["results"]) == 3
