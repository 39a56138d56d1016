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


def import_psgdax_kron():
  """Returns ``psgdax.kron`` (PyPI ``psgdax``), or None when it is not installed."""
  try:
    return importlib.import_module("psgdax").kron
  except ImportError:
    return None


def import_distributed_kron_pro():
  """Returns ``distributed_kron.pro.pro`` (PyPI ``distributed-kron`` 2.0.0), or None when it is
  not installed.

  Its package ``__init__`` imports ``distributed_kron/kron.py``, whose annotations subscript
  ``jax.sharding.PartitionSpec`` (``PartitionSpec[str, str]``), which current JAX rejects
  (``TypeError: type 'P' is not subscriptable``), so ``import distributed_kron`` fails on jax 0.10.
  The workaround a user would apply: make the class subscriptable (the annotation only) before
  the import. ``pro.py`` itself needs flax.
  """
  spec = importlib.import_module("jax.sharding").PartitionSpec
  if not hasattr(spec, "__class_getitem__"):
    spec.__class_getitem__ = classmethod(lambda cls, item: cls)
  try:
    importlib.import_module("distributed_kron")
    return importlib.import_module("distributed_kron.pro").pro
  except ImportError:
    return None
