"""The accelerator check and the compile-time benchmark stay runnable in their CPU forms; the
refit-schedule and lr-transfer studies count and read what they report correctly."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import optax_rlx

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


def _import_benchmark(name):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    return __import__(name)
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("prob", [
    optax_rlx.precond_update_prob_schedule(min_prob=0.1, decay=0.05, flat_start=5), 0.3, 1.0])
def test_refit_schedule_counts_the_refits_kron_takes(prob):
  """kron_defaults.py prices a run by the refits it counts from the schedule: the count must
  be the steps at which kron's factors actually change."""
  kron_defaults = _import_benchmark("kron_defaults")
  steps = 40
  tx = optax_rlx.scale_by_kron(key=0, precond_update_prob=prob)
  params = jnp.zeros((4, 3))
  state, update = tx.init(params), jax.jit(tx.update)
  changed = 0
  for t in range(steps):
    grads = jnp.sin(jnp.arange(12.0).reshape(4, 3) + t)  # never zero: every refit moves Q
    _, new = update(grads, state, params)
    changed += any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(new.Qs), jax.tree.leaves(state.Qs), strict=True))
    state = new
  counts = kron_defaults.refits_before(prob, steps)
  assert counts[steps] == changed and 0 < changed <= steps
  assert (prob != 1.0) == (changed < steps)


def test_lr_transfer_reads_compare_grids(tmp_path):
  """lr_transfer.py's table of kron's loss at AdamW's best lr, a third and a tenth of it."""
  lr_transfer = _import_benchmark("lr_transfer")
  result = lambda name, best, grid: {"optimizer": name, "best_lr": best, "grid": grid}  # noqa: E731
  run = {"mode": "full", "machine": "test", "problems": {"p": {"results": [
      result("optax.adamw", 0.1, {"0.03": 2.0, "0.1": 1.0}),
      result("optax_rlx.kron", 0.01, {"0.01": 0.25, "0.03": 0.5, "0.1": 0.75})]}}}
  path = tmp_path / "compare.json"
  path.write_text(json.dumps(run))
  table = lr_transfer.grid_table(str(path))
  assert "| p | 0.1 | 1 | 0.75 | 0.5 | 0.25 | 0.25 (0.01) |" in table, table
