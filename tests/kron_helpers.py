"""Helpers shared by the Kron tests."""

import typing
from collections.abc import Mapping

import numpy as np

from optax_rlx import _kron_options

# Every geometry kron offers: each geometry-parametrized test runs on all of them.
GEOMETRIES = list(typing.get_args(_kron_options.GeometryName))


def one_unit(groups: Mapping) -> tuple:
  """The arrays of the only fitting unit of a Kron state made for one plain leaf (``state.Qs``,
  ``state.Ls`` or ``state.Ps``): one factor (or estimate) per axis, group axis dropped."""
  (arrays,) = groups.values()
  assert all(np.shape(x)[0] == 1 for x in arrays), [np.shape(x) for x in arrays]
  return tuple(x[0] for x in arrays)
