"""The accelerator check and the compile-time benchmark stay runnable in their CPU forms."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPTIMIZERS = ["optax.adam", "optax.adamw", "optax.contrib.muon", "optax_rlx.kron",
              "optax_rlx.kron (cache_precond)", "optax_rlx.adafactor"]


def _run(script, *args):
  result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_gpu_check_on_a_cpu_runs_its_tiny_form_and_writes_the_table(tmp_path):
  """``python benchmarks/gpu_check.py`` as a user without an accelerator runs it (the defaults
  choose the tiny model on a CPU; about 40 s on 2 idle cores, 2026-12-05)."""
  out = tmp_path / "check.md"
  stdout = _run("gpu_check.py", "--out", str(out))
  table = out.read_text()
  assert "Model tiny" in table and "## batch 4 x 64 tokens" in table
  for name in OPTIMIZERS:
    row = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", table, flags=re.M)
    assert row is not None, name
    cells = [float(c.strip().rstrip("x")) for c in row.group(1).split("|")]
    assert len(cells) == 6 and all(c > 0 for c in cells), (name, cells)
  assert "Skipped" not in table and f"Wrote {out}" in stdout


def test_kron_compile_quick_reports_every_optimizer_against_adam():
  stdout = _run("kron_compile.py", "--quick")
  for name in ["optax.adam", "optax_rlx.kron", "optax_rlx.adafactor"]:
    assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d+ \|$",
                     stdout, flags=re.M), (name, stdout)
  assert "| optax.adam | " in stdout and " 1.0x |" in stdout
