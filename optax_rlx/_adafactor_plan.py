"""Adafactor's static plan: which two axes of each leaf are factored (pure Python and NumPy)."""

import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

FactoringRule = Callable[[str, tuple[int, ...]], tuple[int, int] | None]
"""A per-leaf factoring rule: ``rule(path, shape) -> (row_axis, col_axis)`` or ``None``."""

FactoringName = Literal["largest_two", "last_two", "none"]
"""The named factoring policies."""

POLICIES: tuple[str, ...] = typing.get_args(FactoringName)

Factoring = FactoringName | FactoringRule | Mapping[str, Any] | list[Any] | tuple[Any, ...]
"""``factoring``: a named policy, a rule, or a pytree (dict, list, tuple) of those per leaf."""


def policy_axes(policy: Any, path: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The (row_axis, col_axis) a policy picks for ``shape``, ignoring the minimum size."""
  ndim = len(shape)
  if isinstance(policy, str):
    if ndim < 2 or policy == "none":
      return None
    if policy == "last_two":
      return ndim - 2, ndim - 1
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])
  axes = policy(path, shape)
  if axes is None:
    return None
  if (
      not isinstance(axes, tuple | list)
      or len(axes) != 2
      or not all(isinstance(a, int | np.integer) and -ndim <= a < ndim for a in axes)
      or axes[0] % max(ndim, 1) == axes[1] % max(ndim, 1)
  ):
    raise ValueError(
        f"adafactor: the factoring rule returned {axes!r} for leaf {path} of shape {shape}; "
        f"expected None or two distinct axes in [-{ndim}, {ndim})."
    )
  return int(axes[0]) % ndim, int(axes[1]) % ndim


def factored_axes(policy: Any, path: str, shape: tuple[int, ...], min_dim_size_to_factor: int,
                  for_init: bool) -> tuple[int, int] | None:
  """The factored ``(row_axis, col_axis)`` of a leaf, or None for a full second moment.

  A named policy factors only when both chosen axes have ``min_dim_size_to_factor`` entries;
  that gate is applied at ``init`` (``for_init``), after which the state's shapes decide.
  """
  axes = policy_axes(policy, path, tuple(shape))
  gated = for_init and isinstance(policy, str)
  if gated and axes is not None and min(shape[axes[0]], shape[axes[1]]) < min_dim_size_to_factor:
    return None
  return axes


def check_policy(policy: Any) -> None:
  if isinstance(policy, str):
    if policy not in POLICIES:
      raise ValueError(
          f"adafactor: unknown `factoring` policy {policy!r}; expected one of {POLICIES}, a "
          f"callable rule(path, shape), or a pytree of those matching the params."
      )
  elif not callable(policy):
    raise ValueError(
        f"adafactor: `factoring` leaves must be a policy name {POLICIES} or a callable "
        f"rule(path, shape), got {policy!r}."
    )


def reduced(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  """``shape`` with ``axis`` reduced to size 1 (a keepdims reduction's shape)."""
  return (*shape[:axis], 1, *shape[axis + 1 :])
