"""Kron's static plan: which factors each leaf gets, and how the leaf is laid out for them.

Pure Python and NumPy on shapes: nothing here runs JAX math. The transform
(:mod:`optax_rlx._kron`) builds one :class:`LeafPlan` per leaf at ``init`` and trace time; the
numerics (:mod:`optax_rlx._kron_numerics`) act on one *fitting unit*, a tensor of shape
``plan.block_shape``, and a stacked or blocked leaf is a batch of ``plan.lead`` such units.
"""

import dataclasses

import numpy as np

MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")


@dataclasses.dataclass(frozen=True)
class StructureRule:
  """Which axes get dense factors (see ``scale_by_kron``'s arguments of the same names).

  An axis of a fitting unit is diagonal when its size is 1, above ``max_size_dense``, when the
  unit has fewer than ``min_ndim_dense`` axes, or by ``memory_save_mode``; otherwise it is dense
  when ``size² <= max_skew_dense · numel``, and a *skewed* axis (``size²`` above that) is dense
  when it fits ``dense_budget`` (:func:`plan_leaves`). ``block_size`` (or None) cuts long axes
  into equal blocks first.
  """

  max_size_dense: int
  min_ndim_dense: int
  max_skew_dense: float
  memory_save_mode: str | None
  block_size: int | None
  dense_budget: float = 0.0


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
  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The state's factor shapes: ``lead + (d, d)`` dense, ``lead + (d,)`` diagonal."""
    return tuple(
        (*self.lead, d, d) if is_dense else (*self.lead, d)
        for d, is_dense in zip(self.block_shape, self.dense, strict=True)
    )


def block_count(d: int, block_size: int | None) -> int:
  """Fewest equal blocks of size <= ``block_size`` an axis of size ``d`` splits into."""
  if block_size is None or d <= block_size:
    return 1
  return next(n for n in range(-(-d // block_size), d + 1) if d % n == 0)


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


def _units(plan: LeafPlan) -> int:
  return plan.lead[0] if plan.batched else 1


def dense_entries(plans: list[LeafPlan]) -> int:
  """Entries of every dense factor of ``plans`` (``d²`` per dense axis and fitting unit)."""
  return sum(_units(p) * sum(d * d for d, is_dense in zip(p.block_shape, p.dense, strict=True)
                             if is_dense) for p in plans)


def plan_leaves(shapes: list[tuple[int, ...]], stacked: list[bool], rule: StructureRule,
                paths: list[str]) -> list[LeafPlan]:
  """Plans of all leaves of a tree: :func:`make_plan`, then skewed axes made dense under a budget.

  A skewed axis (allowed a dense factor, but ``d² > max_skew_dense · numel``) is made dense when
  all dense factors together, of every leaf, still hold at most ``rule.dense_budget`` times the
  leaves' entries. Skewed axes are taken in classes (one axis of one unit shape, so equal layers
  get equal factors), least skewed (smallest ``d² / numel``) first, and a class is taken whole or
  not at all. So the budget goes to the factors that cost the least relative to their leaf: a
  fused ``(d, 3d)`` projection before a ``(d, 4d)`` MLP matrix or a vocabulary.
  """
  plans = [make_plan(s, k, rule, p) for s, k, p in zip(shapes, stacked, paths, strict=True)]
  budget = rule.dense_budget * sum(int(np.prod(s)) for s in shapes)
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
    cost = shape[axis] ** 2 * sum(_units(plans[i]) for i in members)
    if total + cost > budget:
      continue
    total += cost
    for i in members:
      dense = tuple(x or k == axis for k, x in enumerate(plans[i].dense))
      plans[i] = dataclasses.replace(plans[i], dense=dense)
  return plans


def check_factor_shapes(plan: LeafPlan, shapes: tuple[tuple[int, ...], ...], path: str) -> None:
  """Raises ``ValueError`` unless a state's factor ``shapes`` are the ones ``plan`` lays out."""
  if shapes != plan.factor_shapes:
    raise ValueError(
        f"kron: leaf {path} has gradient shape {plan.leaf_shape}, which does not match its "
        f"preconditioner factors {shapes}."
    )


def to_inner(x, plan: LeafPlan):
  """A leaf-shaped array as ``plan.lead + plan.block_shape``: layers and blocks on one axis.

  Works on any array with ``reshape`` and ``transpose`` (JAX or NumPy).
  """
  layers = (plan.leaf_shape[0],) if plan.stacked else ()
  full = tuple(d * n for d, n in zip(plan.block_shape, plan.blocks, strict=True))
  x = x.reshape(layers + full)
  if not plan.blocked:
    return x
  k = len(layers)
  split = layers + tuple(
      v for n, d in zip(plan.blocks, plan.block_shape, strict=True) for v in (n, d)
  )
  x = x.reshape(split)
  r = len(plan.block_shape)
  block_index_axes = tuple(k + 2 * i for i in range(r))
  within_block_axes = tuple(k + 2 * i + 1 for i in range(r))
  perm = tuple(range(k)) + block_index_axes + within_block_axes
  return x.transpose(perm).reshape(plan.lead + plan.block_shape)


def from_inner(u, plan: LeafPlan):
  """Inverse of :func:`to_inner`: back to the leaf's shape."""
  if plan.blocked:
    layers = (plan.leaf_shape[0],) if plan.stacked else ()
    k, r = len(layers), len(plan.block_shape)
    u = u.reshape(layers + plan.blocks + plan.block_shape)
    perm = tuple(range(k)) + tuple(v for i in range(r) for v in (k + i, k + r + i))
    u = u.transpose(perm)
  return u.reshape(plan.leaf_shape)


@dataclasses.dataclass(frozen=True)
class FactorGroup:
  """Fitting units (of any leaves, layers and blocks) with the same factor layout, stored and
  fitted as one batch along a leading group axis.

  Attributes:
    block_shape: the units' shape (see :class:`LeafPlan`).
    dense: per axis, dense or diagonal.
    dtypes: the units' dtype key (factor and compute dtypes; opaque here, it only has to match).
    units: fitting units taken from the leaves.
    size: length of the group axis: ``units`` padded up to a multiple of the group multiple
      (padding units are fitted on zeros and never applied).
  """

  block_shape: tuple[int, ...]
  dense: tuple[bool, ...]
  dtypes: tuple[str, ...]
  units: int
  size: int

  @property
  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """The group's factor shapes: ``(size, d, d)`` dense, ``(size, d)`` diagonal."""
    return tuple(
        (self.size, d, d) if is_dense else (self.size, d)
        for d, is_dense in zip(self.block_shape, self.dense, strict=True)
    )


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where a leaf's units sit in their group: ``group``'s units ``start … start + count - 1``."""

  group: int
  start: int
  count: int


def group_units(plans: list[LeafPlan], dtype_keys: list[tuple[str, ...]],
                multiple: int) -> tuple[tuple[FactorGroup, ...], tuple[Slot, ...]]:
  """Groups every leaf's fitting units by ``(block_shape, dense, dtype key)``.

  Groups are ordered by their first leaf, and units within a group by leaf, then by the leaf's
  layers and blocks (:func:`to_inner` order). Each group's size is rounded up to a multiple of
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
    count = plan.lead[0] if plan.batched else 1
    slots.append(Slot(group=g, start=counts[g], count=count))
    counts[g] += count
  groups = tuple(
      FactorGroup(block_shape=shape, dense=dense, dtypes=dtypes, units=n,
                  size=-(-n // multiple) * multiple)
      for (shape, dense, dtypes), n in zip(index, counts, strict=True)
  )
  return groups, tuple(slots)


def to_units(x, plan: LeafPlan):
  """A leaf-shaped array as ``(count,) + plan.block_shape``, its units along a leading axis."""
  x = to_inner(x, plan)
  return x if plan.batched else x.reshape((1, *plan.block_shape))


def from_units(u, plan: LeafPlan):
  """Inverse of :func:`to_units`."""
  return from_inner(u if plan.batched else u.reshape(plan.block_shape), plan)
