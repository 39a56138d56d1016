"""Sharded params on 8 simulated CPU devices give the unsharded results (Auto and Explicit meshes).

JAX fixes the device count when its backend starts, so each check is a module of its own
(``tests/multidevice_*.py``) run in a fresh Python with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import xla_test_flags

HERE = pathlib.Path(__file__).resolve().parent


def _run_on_8_devices(module, *args):
  """Runs ``tests/<module>.py`` in a fresh Python with 8 simulated CPU devices; its stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  xla_test_flags.apply(env)  # the session's other flags too
  result = subprocess.run(
      [sys.executable, str(HERE / f"{module}.py"), *args], env=env, capture_output=True,
      text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_params_give_unsharded_results(axis_type):
  stdout = _run_on_8_devices("multidevice_parity", axis_type)
  assert stdout.count("ok ") == 2, stdout


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_state_sharding_layout_hlo_and_checkpoint(axis_type):
  stdout = _run_on_8_devices("multidevice_state_layout", axis_type)
  assert stdout.count("ok ") == 5, stdout


def test_factor_groups_are_sharded_and_match_the_unsharded_step():
  stdout = _run_on_8_devices("multidevice_groups")
  assert stdout.count("ok ") == 9, stdout  # with quad (one layout)
