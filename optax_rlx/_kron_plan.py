"""Kron's static plan: which factors each leaf gets, and where its fitting units are stored.

Pure Python and NumPy on shapes: nothing here runs JAX math. :func:`plan_layout` turns the
leaves' shapes (and the structure options) into a :class:`Layout`, at ``init`` and again at every
trace of ``update``: the layout is derived, never stored. The numerics act on one *fitting
unit*, a tensor of shape ``plan.block_shape``; a stacked or blocked leaf is a batch of
``plan.lead`` such units. Units of every leaf with the same factor shapes and dtypes form one
:class:`FactorGroup`, stored under the group's :attr:`FactorGroup.name` in the state.
"""

import dataclasses
from typing import Any, NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class StructureRule:
  """Which axes get dense factors (``scale_by_kron``'s options of the same names).

  An axis of a fitting unit is diagonal when its size is 1, above ``max_size_dense``, when the
  unit has fewer than ``min_ndim_dense`` axes, or by ``memory_save_mode``; otherwise it is dense
  when ``size² <= max_skew_dense · numel``, and a *skewed* axis (``size²`` above that) is dense
  when it fits ``dense_budget`` (:func:`plan_layout`). ``block_size`` (or None) cuts long axes
  into equal blocks first.
  """

  max_size_dense: int
  min_ndim_dense: int
  max_skew_dense: float
  memory_save_mode: str | None
  block_size: int | None
  dense_budget: float = 0.0


class DtypeKey(NamedTuple):
  """The dtype names of a leaf's units: dense factors, diagonal factors, and the computations
  (Gram terms, norms). Units group only with units of the same key."""

  dense: str
  diagonal: str
  compute: str


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """What the plan needs to know of one leaf.

  Attributes:
    path: the leaf's key path, for messages (e.g. ``['block0']['qkv']``).
    shape: the leaf's shape.
    stacked: whether its leading axis stacks layers (``stacked_layers``).
    dtypes: its units' :class:`DtypeKey`.
  """

  path: str
  shape: tuple[int, ...]
  stacked: bool
  dtypes: DtypeKey


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static description of one leaf's preconditioner.

  Attributes:
    block_shape: shape of one fitting unit, the tensor the factors act on: the leaf's shape
      without its layer axis, divided into blocks; scalars become ``(1,)``.
    dense: per axis of ``block_shape``: a dense ``(d, d)`` factor (True) or a diagonal ``(d,)``.
    stacked: whether the leaf's leading axis stacks layers, each with its own factors.
    leaf_shape: the leaf's own shape.
    blocks: per axis of the (unstacked) leaf, the number of equal blocks it is cut into.
  """

  block_shape: tuple[int, ...]
  dense: tuple[bool, ...]
  stacked: bool
  leaf_shape: tuple[int, ...]
  blocks: tuple[int, ...]

  @property
  def blocked(self) -> bool:
    return any(b > 1 for b in self.blocks)

  @property
  def batched(self) -> bool:
    """Whether the factors carry a leading axis (layers and/or blocks) and the fit is vmapped."""
    return self.stacked or self.blocked

  @property
  def lead(self) -> tuple[int, ...]:
    """``(layers · blocks,)`` for a batched leaf, ``()`` otherwise."""
    if not self.batched:
      return ()
    layers = self.leaf_shape[0] if self.stacked else 1
    return (layers * int(np.prod(self.blocks)),)

  @property
  def units(self) -> int:
    """Number of fitting units (layers times blocks; 1 for a plain leaf)."""
    return self.lead[0] if self.batched else 1

  @property
  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The leaf's factor shapes: ``lead + (d, d)`` dense, ``lead + (d,)`` diagonal."""
    return _factor_shapes(self.lead, self.block_shape, self.dense)


@dataclasses.dataclass(frozen=True)
class FactorGroup:
  """Fitting units (of any leaves, layers and blocks) with the same factor layout, stored and
  fitted as one batch along a leading group axis.

  Attributes:
    block_shape: the units' shape (see :class:`LeafPlan`).
    dense: per axis, dense or diagonal.
    dtypes: the units' :class:`DtypeKey`.
    units: fitting units taken from the leaves.
    size: length of the group axis: ``units`` padded up to a multiple of the group multiple
      (padding units are fitted on zeros and never applied).
    dense_kind: what the dense factors are where the geometry makes them other than Hermitian
      positive definite (``'triangular'``), else ``''``; part of :attr:`name`, so that a state
      of one geometry is not taken for another's.
  """

  block_shape: tuple[int, ...]
  dense: tuple[bool, ...]
  dtypes: DtypeKey
  units: int
  size: int
  dense_kind: str = ""

  @property
  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The group's factor shapes: ``(size, d, d)`` dense, ``(size, d)`` diagonal."""
    return _factor_shapes((self.size,), self.block_shape, self.dense)

  @property
  def name(self) -> str:
    """The group's key in the state: its factors' shapes and storage dtype, e.g.
    ``64x64_192x192_float32`` (two dense factors), ``64x64_256_bfloat16_float32`` (a dense and a
    diagonal factor stored in bfloat16, computed in float32), ``7_float32_complex64`` (the
    diagonal factor of a complex vector), ``8x8_5x5_float32_triangular`` (upper-triangular dense
    factors). The compute dtype is named when it differs."""
    stored = self.dtypes.dense if any(self.dense) else self.dtypes.diagonal
    compute = self.dtypes.compute
    name = f"{self.shapes}_{stored}" + ("" if stored == compute else f"_{compute}")
    return f"{name}_{self.dense_kind}" if self.dense_kind and any(self.dense) else name

  @property
  def shapes(self) -> str:
    """The factor shapes part of :attr:`name`, e.g. ``64x64_256``."""
    return "_".join(f"{d}x{d}" if is_dense else f"{d}"
                    for d, is_dense in zip(self.block_shape, self.dense, strict=True))

  @property
  def factor_dtypes(self) -> tuple[str, ...]:
    """Per axis, the dtype name of its factors."""
    return tuple(self.dtypes.dense if d else self.dtypes.diagonal for d in self.dense)


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where a leaf's units sit in their group: ``group``'s units ``start … start + count - 1``."""

  group: int
  start: int
  count: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every leaf's plan and where its units are stored.

  Attributes:
    paths: the leaves' key paths, in flattening order.
    plans: one :class:`LeafPlan` per leaf.
    groups: the factor groups, ordered by their first leaf.
    slots: one :class:`Slot` per leaf.
  """

  paths: tuple[str, ...]
  plans: tuple[LeafPlan, ...]
  groups: tuple[FactorGroup, ...]
  slots: tuple[Slot, ...]

  def members(self, group: int) -> list[int]:
    """The indices of the leaves with units in ``group``, in storage order."""
    return [i for i, slot in enumerate(self.slots) if slot.group == group]


def plan_layout(leaves: list[LeafSpec], rule: StructureRule, multiple: int,
                dense_kind: str = "") -> Layout:
  """The :class:`Layout` of a tree's leaves: plans (:func:`plan_leaves`), grouped by factor
  shapes and dtypes, each group padded to a multiple of ``multiple`` units (``dense_kind``: see
  :class:`FactorGroup`)."""
  plans = plan_leaves(leaves, rule)
  groups, slots = group_units(plans, [leaf.dtypes for leaf in leaves], multiple)
  groups = tuple(dataclasses.replace(g, dense_kind=dense_kind) for g in groups)
  return Layout(paths=tuple(leaf.path for leaf in leaves), plans=tuple(plans), groups=groups,
                slots=slots)


def plan_leaves(leaves: list[LeafSpec], rule: StructureRule) -> list[LeafPlan]:
  """Plans of all leaves of a tree: :func:`make_plan`, then skewed axes made dense under a budget.

  A skewed axis (allowed a dense factor, but ``d² > max_skew_dense · numel``) is made dense when
  all dense factors together, of every leaf, still hold at most ``rule.dense_budget`` times the
  leaves' entries. Skewed axes are taken in classes (one axis of one unit shape, so equal layers
  get equal factors), least skewed (smallest ``d² / numel``) first, and a class is taken whole or
  not at all. So the budget goes to the factors that cost the least relative to their leaf: a
  fused ``(d, 3d)`` projection before a ``(d, 4d)`` MLP matrix or a vocabulary.
  """
  plans = [make_plan(leaf.shape, leaf.stacked, rule, leaf.path) for leaf in leaves]
  budget = rule.dense_budget * sum(int(np.prod(leaf.shape)) for leaf in leaves)
  classes: dict[tuple, list[int]] = {}
  for i, plan in enumerate(plans):
    if 0 in plan.block_shape:  # an empty leaf: nothing to fit
      continue
    allowed = _allowed_dense(plan.block_shape, rule)
    for axis, (ok, is_dense) in enumerate(zip(allowed, plan.dense, strict=True)):
      if ok and not is_dense:
        classes.setdefault((plan.block_shape, axis), []).append(i)
  total = dense_entries(plans)

  def skew(key):
    shape, axis = key
    return (shape[axis] ** 2 / int(np.prod(shape)), shape[axis])

  for shape, axis in sorted(classes, key=skew):
    members = classes[(shape, axis)]
    cost = shape[axis] ** 2 * sum(plans[i].units for i in members)
    if total + cost > budget:
      continue
    total += cost
    for i in members:
      dense = tuple(x or k == axis for k, x in enumerate(plans[i].dense))
      plans[i] = dataclasses.replace(plans[i], dense=dense)
  return plans


def make_plan(shape: tuple[int, ...], stacked: bool, rule: StructureRule, path: str) -> LeafPlan:
  """The plan of a leaf of ``shape`` by the per-leaf rules alone (``path`` names it in errors):
  skewed axes are diagonal here; :func:`plan_leaves` adds those that fit ``rule.dense_budget``.
  """
  leaf_shape = tuple(shape)
  if stacked:
    if len(shape) == 0:
      raise ValueError(
          f"kron: leaf {path} is declared in `stacked_layers` but is a scalar; a stacked "
          f"leaf needs a leading layer axis."
      )
    shape = shape[1:]
  shape = tuple(shape) if len(shape) else (1,)
  blocks = tuple(block_count(d, rule.block_size) for d in shape)
  block_shape = tuple(d // n for d, n in zip(shape, blocks, strict=True))
  numel = int(np.prod(block_shape))
  dense = tuple(
      allowed and d * d <= rule.max_skew_dense * numel
      for d, allowed in zip(block_shape, _allowed_dense(block_shape, rule), strict=True)
  )
  return LeafPlan(
      block_shape=block_shape, dense=dense, stacked=stacked, leaf_shape=leaf_shape, blocks=blocks
  )


def group_units(plans: list[LeafPlan], dtype_keys: list[DtypeKey],
                multiple: int) -> tuple[tuple[FactorGroup, ...], tuple[Slot, ...]]:
  """Groups every leaf's fitting units by ``(block_shape, dense, dtype key)``.

  Groups are ordered by their first leaf, and units within a group by leaf, then by the leaf's
  layers and blocks (:func:`to_units` order). Each group's size is rounded up to a multiple of
  ``multiple``. Returns the groups and one :class:`Slot` per leaf.
  """
  index: dict[tuple, int] = {}
  counts: list[int] = []
  slots = []
  for plan, dtypes in zip(plans, dtype_keys, strict=True):
    key = (plan.block_shape, plan.dense, dtypes)
    g = index.setdefault(key, len(index))
    if g == len(counts):
      counts.append(0)
    slots.append(Slot(group=g, start=counts[g], count=plan.units))
    counts[g] += plan.units
  groups = tuple(
      FactorGroup(block_shape=shape, dense=dense, dtypes=dtypes, units=n,
                  size=-(-n // multiple) * multiple)
      for (shape, dense, dtypes), n in zip(index, counts, strict=True)
  )
  return groups, tuple(slots)


def block_count(d: int, block_size: int | None) -> int:
  """Fewest equal blocks of size <= ``block_size`` an axis of size ``d`` splits into."""
  if block_size is None or d <= block_size:
    return 1
  return next(n for n in range(-(-d // block_size), d + 1) if d % n == 0)


def dense_entries(plans: list[LeafPlan]) -> int:
  """Entries of every dense factor of ``plans`` (``d²`` per dense axis and fitting unit)."""
  return sum(p.units * sum(d * d for d, is_dense in zip(p.block_shape, p.dense, strict=True)
                           if is_dense) for p in plans)


def to_units(x: Any, plan: LeafPlan) -> Any:
  """A leaf-shaped array as ``(units,) + plan.block_shape``: layers and blocks on one axis.

  Works on any array with ``reshape`` and ``transpose`` (JAX or NumPy).
  """
  layers = (plan.leaf_shape[0],) if plan.stacked else ()
  full = tuple(d * n for d, n in zip(plan.block_shape, plan.blocks, strict=True))
  x = x.reshape(layers + full)
  if plan.blocked:
    k = len(layers)
    split = layers + tuple(
        v for n, d in zip(plan.blocks, plan.block_shape, strict=True) for v in (n, d)
    )
    r = len(plan.block_shape)
    block_index_axes = tuple(k + 2 * i for i in range(r))
    within_block_axes = tuple(k + 2 * i + 1 for i in range(r))
    x = x.reshape(split).transpose(tuple(range(k)) + block_index_axes + within_block_axes)
  return x.reshape((plan.units, *plan.block_shape))


def from_units(u: Any, plan: LeafPlan) -> Any:
  """Inverse of :func:`to_units`: back to the leaf's shape."""
  if plan.blocked:
    layers = (plan.leaf_shape[0],) if plan.stacked else ()
    k, r = len(layers), len(plan.block_shape)
    u = u.reshape(layers + plan.blocks + plan.block_shape)
    u = u.transpose(tuple(range(k)) + tuple(v for i in range(r) for v in (k + i, k + r + i)))
  return u.reshape(plan.leaf_shape)


def _factor_shapes(lead: tuple[int, ...], block_shape: tuple[int, ...],
                   dense: tuple[bool, ...]) -> tuple[tuple[int, ...], ...]:
  return tuple((*lead, d, d) if is_dense else (*lead, d)
               for d, is_dense in zip(block_shape, dense, strict=True))


def _diagonal_axes(block_shape: tuple[int, ...], memory_save_mode: str | None) -> set[int]:
  if memory_save_mode == "all_diag":
    return set(range(len(block_shape)))
  if memory_save_mode == "one_diag":
    return {int(np.argsort(np.asarray(block_shape), kind="stable")[-1])}
  return set()


def _allowed_dense(block_shape: tuple[int, ...], rule: StructureRule) -> tuple[bool, ...]:
  """Per axis, whether a dense factor is allowed at all (every rule but the skew rule)."""
  diagonal = _diagonal_axes(block_shape, rule.memory_save_mode)
  return tuple(
      i not in diagonal and 1 < d <= rule.max_size_dense and len(block_shape) >= rule.min_ndim_dense
      for i, d in enumerate(block_shape)
  )
