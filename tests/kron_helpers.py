"""Helpers shared by the Kron tests."""

from collections.abc import Mapping

import numpy as np


def one_unit(groups: Mapping) -> tuple:
  """The arrays of the only fitting unit of a Kron state made for one plain leaf (``state.Qs``,
  ``state.Ls`` or ``state.Ps``): one factor (or estimate) per axis, group axis dropped."""
  (arrays,) = groups.values()
  assert all(np.shape(x)[0] == 1 for x in arrays), [np.shape(x) for x in arrays]
  return tuple(x[0] for x in arrays)
