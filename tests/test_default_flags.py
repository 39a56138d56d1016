"""What users run: checks under jaxlib's default XLA flags, in a fresh process (the suite itself
runs at backend optimisation level 0, ``tests/xla_test_flags.py``, which hid a CPU deadlock)."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def test_checks_pass_under_the_default_xla_flags():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  # A deadlock shows as the timeout (a healthy run takes ~20 s on 2 cores).
  result = subprocess.run([sys.executable, str(HERE / "default_flags_checks.py")], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:2] == ["ok triangular", "ok float32 range"], result.stdout
