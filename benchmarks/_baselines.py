"""Optional third-party baselines for the benchmarks (never imported by the library or tests)."""

import importlib
import sys


def import_psgd_jax_kron():
  """Returns ``psgd_jax.kron.kron``, or None when psgd_jax is not installed.

  psgd_jax 0.2.9 imports ``optax._src.clipping``, which optax >= 0.2.5 moved to
  ``optax.transforms._clipping``; this shim aliases the old path for the benchmark only.
  """
  try:
    importlib.import_module("optax._src.clipping")
  except ImportError:
    try:
      clipping = importlib.import_module("optax.transforms._clipping")
    except ImportError:
      return None
    sys.modules["optax._src.clipping"] = clipping
    importlib.import_module("optax._src").clipping = clipping
  try:
    return importlib.import_module("psgd_jax.kron").kron
  except ImportError:
    return None
