"""Test configuration: harden JAX so silent broadcasting bugs fail loudly."""

import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
  """A NumPy generator seeded from the test's id, so every test is reproducible on its own."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
