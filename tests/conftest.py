"""Test configuration: XLA's test flags (``xla_test_flags``), a compilation cache shared by the
session's workers, slow tests first, and JAX hardened so silent broadcasting bugs fail loudly."""

import os
import shutil
import tempfile
import zlib

import xla_test_flags

xla_test_flags.apply()

import jax  # noqa: E402  (after the flags: XLA reads them when its backend starts)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same program (a fresh optimizer object, the same update on the same
# tree); JAX's persistent cache, in one directory per session that the controller makes and the
# xdist workers inherit through the environment, compiles each once (conformance suite 181 s ->
# 151 s on 2 cores, measured 2026-12-03). Removed when the session ends.
_CACHE_ENV = "OPTAX_RLX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = _CACHE_ENV not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="optax_rlx_jax_cache_")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# Subprocess tests with 8 simulated devices take 30-75 s each: started first, so the other
# worker is not left waiting for one of them at the end.
_SLOW_FIRST = ("test_sharding.py", "test_benchmark_scripts.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in _SLOW_FIRST)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture
def rng(request):
  """A NumPy generator seeded from the test's id, so every test is reproducible on its own."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
